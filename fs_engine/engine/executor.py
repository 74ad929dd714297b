"""Executors carry step plans from the frontend to the workers and bring back the results.

``InProcessExecutor`` runs one worker and the copy threads in this process (offline API, tests). The
multi-process executor implements the same members over sockets. Both run a plan through
``swaps.start_plan`` / ``finish_plan``: one copy orchestration for every engine.

``submit(plan)`` starts a step and ``collect()`` returns its result; between the two the frontend does
the work that does not need it (in this process the step has already run by then; with worker processes
it runs meanwhile). ``execute(plan)`` is both at once.
"""

from __future__ import annotations

from fs_engine.config import EngineConfig
from fs_engine.kv.layout import KVLayout
from fs_engine.model_config import ModelArch
from fs_engine.engine.swaps import PlanInFlight, ThreadSwaps, finish_plan, start_plan
from ipc.messages import StepPlan, StepResult


class InProcessExecutor:
    def __init__(self, config: EngineConfig, arch: ModelArch, max_model_len: int) -> None:
        from workers.gpu_worker import Worker  # the frontend imports tensor code only for in-process mode

        self.worker = Worker(config, arch, max_model_len)
        self.num_blocks, self.num_cpu_blocks = self.worker.init_kv_cache()
        self.layout: KVLayout = self.worker.layout
        self.device: str = str(self.worker.device)
        self.forward: str = self.worker.runner.forward_summary()  # eager, or compiled in how long
        self.swaps: ThreadSwaps | None = None
        if self.num_cpu_blocks > 0:
            self.swaps = ThreadSwaps(self.worker.runner.kv_arena, self.worker.host_arena(),
                                     config.swap.copy_granularity, config.swap.swap_threads)

        self.max_steps_in_flight = 1  # a step runs inside submit: there is nothing to overlap it with
        self._run: PlanInFlight | None = None

    def submit(self, plan: StepPlan) -> None:
        self._run = start_plan(plan, self.swaps, self.worker.execute)  # the step runs here and now

    def collect(self) -> StepResult:
        run, self._run = self._run, None
        return finish_plan(run, self.swaps)

    def execute(self, plan: StepPlan) -> StepResult:
        self.submit(plan)
        return self.collect()

    def check_health(self) -> None:
        """Everything runs in this process: if it is alive, so is the engine."""

    def stats(self) -> dict[str, float]:
        """Executor-specific counters for ``LLMEngine.stats`` (the simulated executor reports its clock); with
        ``compile`` on, how many times the forward was compiled (once at start-up in steady state)."""
        runner = self.worker.runner if self.worker is not None else None
        return {"num_compilations": runner.num_compilations} if runner and runner.compiled is not None else {}

    def shutdown(self) -> None:
        if self.swaps is not None:
            self.swaps.shutdown()
            self.swaps = None
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None

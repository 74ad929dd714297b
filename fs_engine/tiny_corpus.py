"""Embedded training text for the tiny offline BPE tokenizer.

The tokenizer built by :mod:`fs_engine.tiny_model` is trained on this string so
that test and default checkpoints never need network access.  The text mixes
plain prose, dialogue, source code, JSON, numbers and a little non-English
text so that common English words, code punctuation and digits all get merged
tokens.  Changing this text changes every generated tokenizer (and therefore
the cache key of the default model), so treat it as frozen.
"""

TINY_CORPUS = r'''
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
Once upon a time, in a small town by the sea, there lived an old clockmaker named
Elias. Every morning he opened the shutters of his shop, wound the great clock
above the door, and waited for the first customer of the day. People came from
the nearby villages with broken watches, silent music boxes and clocks that ran
too fast or too slow. Elias listened to each one as if it were telling him a
story, and then he took it apart, piece by piece, until he found the problem.

"Why do you always smile when a clock is broken?" asked a young girl one day.
"Because every broken thing is a puzzle," he said, "and every puzzle has an answer."
She thought about this for a long time. "What if the answer is that it cannot be fixed?"
"Then that is an answer too," said Elias, "and it is still worth knowing."

A language model reads a sequence of tokens and predicts the next one. During
serving, the engine keeps a key-value cache for every running request so that
earlier tokens do not have to be processed again. When memory runs out, some
requests must be preempted: their cache blocks are either swapped to host memory
or dropped and recomputed later. A fair scheduler tries to give every user a
reasonable share of the GPU while keeping the total throughput high. Switching
between requests should be cheap, because frequent switching is what makes the
schedule fair in the first place.

The weather today will be cloudy in the morning, with a chance of rain in the
afternoon. Temperatures will range from 12 to 18 degrees Celsius. Winds from the
north-west at 20 kilometres per hour. Tomorrow should be sunny and warmer, with
highs near 23 degrees. The weekend looks dry, although the evenings will be cool.

Recipe for simple bread: mix 500 grams of flour, 10 grams of salt, 7 grams of
dry yeast and 350 millilitres of warm water. Knead the dough for ten minutes,
then let it rise for one hour in a warm place. Shape the loaf, let it rise again
for 45 minutes, and bake at 220 degrees for about 30 minutes until golden brown.

def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks))
        self.ref_counts = {}

    def allocate(self) -> int:
        if not self.free_blocks:
            raise RuntimeError("out of KV cache blocks")
        block = self.free_blocks.pop()
        self.ref_counts[block] = 1
        return block

    def free(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            del self.ref_counts[block]
            self.free_blocks.append(block)


for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

import json
import os

config = {"model": "tiny", "hidden_size": 64, "num_layers": 2, "vocab_size": 1024}
with open(os.path.join("out", "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)

{"id": "req-0001", "prompt": "Hello, world!", "max_tokens": 128, "temperature": 0.7, "stream": true}
{"id": "req-0002", "prompt": "Summarize the article.", "max_tokens": 256, "temperature": 0.0, "stream": false}
{"role": "system", "content": "You are a helpful assistant."}
{"role": "user", "content": "What is the capital of France?"}
{"role": "assistant", "content": "The capital of France is Paris."}

int main(int argc, char **argv) {
    for (int i = 0; i < argc; ++i) {
        printf("arg %d: %s\n", i, argv[i]);
    }
    return 0;
}

SELECT user_id, COUNT(*) AS requests, AVG(latency_ms) AS mean_latency
FROM request_log
WHERE created_at >= '2024-01-01'
GROUP BY user_id
ORDER BY requests DESC
LIMIT 10;

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024 2048 4096
3.14159 2.71828 1.41421 0.5 0.25 0.125 1e-6 1e-5 100% 42 1,000 10,000 1,000,000
Dates: 2023-05-17, 2024-02-29, 1999-12-31. Times: 09:30, 12:00, 23:59:59.
Prices: $4.99, $19.95, $120.00, EUR 35, GBP 12.50. Phone: +1 555 0100.

Q: How many legs does a spider have?
A: A spider has eight legs.
Q: What is twelve times twelve?
A: Twelve times twelve is one hundred and forty-four.
Q: Which planet is closest to the sun?
A: Mercury is the closest planet to the sun.
Q: What do plants need to grow?
A: Plants need light, water, air and nutrients from the soil.

History is full of small decisions that turned out to matter. A letter that
arrived a day late, a bridge that was built a little too narrow, a ship that
left the harbour an hour early. None of these seemed important at the time.
Only later, when people looked back, did they see how one thing had led to
another, and how the whole story might have been different.

The library was quiet except for the sound of pages turning. Maria found a
table near the window, opened her notebook, and began to write. She wrote about
the river she had crossed that morning, the birds on the telephone wires, the
man selling oranges at the corner of the market. Writing helped her notice
things; it made the ordinary world feel strange and new.

Instructions: first, open the settings menu. Second, select the network tab.
Third, enter the server address and the port number. Finally, press the save
button and restart the application. If the connection still fails, check the
firewall rules and make sure the service is running.

Il fait beau aujourd'hui. Das Wetter ist heute schön. Hoy hace buen tiempo.
Merci beaucoup! Vielen Dank! ¡Muchas gracias! Café, naïve, façade, über, señor.
Greek: αβγδε. Russian: привет мир. Japanese: こんにちは世界. Chinese: 你好，世界。
Emoji: 🙂 🚀 ✅ — “quoted” ‘text’ … and more.

$ pip install fs-engine
$ python -m pytest tests -q
$ git status && git diff --stat
error: command failed with exit code 1
warning: unused variable `x` at line 42
INFO 2024-03-01 10:15:02 scheduler: 8 running, 3 waiting, 2 swapped
'''

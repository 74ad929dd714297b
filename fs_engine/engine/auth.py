"""Who a client is: the keys file that binds credentials to tenants, and ZeroMQ CURVE authentication.

Without a keys file anyone who reaches the port can send requests under any tenant name (the README says so).
With one (``fs-engine launch --keys keys.json --server-key server.key_secret``) only clients holding a listed
CURVE key can connect at all, every request runs as the tenant its key belongs to, and the tenants' weights
are the fair-share (vtc) weights. The file::

    {
      "tenants": {
        "alice": {"weight": 2, "curve_keys": ["alice.key"], "api_keys": ["sk-alice-..."]},
        "bob": {"curve_keys": ["Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"]}
      }
    }

A CURVE key is a client's public key in Z85 text, or the name of a certificate file made by ``fs-engine keys``
(relative to the keys file); ``api_keys`` are bearer tokens for HTTP front ends. No credential may name two
tenants. The schema is a pydantic model, so a mistake is reported with the field it is in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import pydantic
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from fs_engine.config import parse_tenant_weights
from ipc.channels import ZAP_DOMAIN

MAX_LABEL_CHARS = 1024  # as LLMEngine's tenant names

Label = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=MAX_LABEL_CHARS)]


class TenantKeys(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    weight: Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)] = 1.0
    curve_keys: list[Annotated[str, pydantic.StringConstraints(min_length=1)]] = []
    api_keys: list[Annotated[str, pydantic.StringConstraints(min_length=16)]] = []


class KeysFile(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    tenants: dict[Label, TenantKeys]


class Keys:
    """A loaded keys file: tenant of each CURVE public key (raw 32 bytes) and API key, and the weights."""

    def __init__(self, tenants: dict[str, TenantKeys], base: Path) -> None:
        self.weights = {name: t.weight for name, t in tenants.items()}
        self.by_curve_key: dict[bytes, str] = {}
        self.by_api_key: dict[str, str] = {}
        for name, t in tenants.items():
            for text in t.curve_keys:
                self._bind(self.by_curve_key, _curve_key(text, base), name, f"curve key {text!r}")
            for key in t.api_keys:
                self._bind(self.by_api_key, key, name, "an api key")
        if not self.by_curve_key and not self.by_api_key:
            raise ValueError("the keys file lists no curve_keys or api_keys: nobody could connect")

    @staticmethod
    def _bind(table: dict, key: bytes | str, tenant: str, what: str) -> None:
        if table.setdefault(key, tenant) != tenant:
            raise ValueError(f"{what} is listed for two tenants ({table[key]!r} and {tenant!r}): a credential "
                             f"names one tenant")

    @classmethod
    def load(cls, path: str | Path) -> Keys:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise ValueError(f"cannot read the keys file {str(path)!r}: {e.strerror}") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"the keys file {str(path)!r} is not JSON: {e}") from e
        try:
            parsed = KeysFile.model_validate(data)
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"keys file {str(path)!r}: {where}: {first['msg']} ({len(e.errors())} error(s); "
                             f"see fs_engine/engine/auth.py for the format)") from e
        return cls(parsed.tenants, path.parent)

    def merged_weights(self, given: Any) -> dict[str, float]:
        """The fair-share weights of a launch with this file: ``given`` (``--tenant-weights``) and the file's; a
        tenant in both must weigh the same in both."""
        weights = dict(parse_tenant_weights(given))
        for tenant, weight in self.weights.items():
            if weights.setdefault(tenant, weight) != weight:
                raise ValueError(f"tenant {tenant!r} weighs {weights[tenant]:g} in --tenant-weights and {weight:g} "
                                 f"in the keys file: give it in one place")
        return weights


def _curve_key(text: str, base: Path) -> bytes:
    """A Z85 public key, or a certificate file's public key."""
    if len(text) == 40:
        try:
            key = z85.decode(text.encode("ascii"))
        except (ValueError, UnicodeEncodeError, KeyError):
            key = b""
        if len(key) == 32:
            return key
    path = base / text
    if path.is_file():
        try:
            public, _ = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the certificate {str(path)!r}: {e}") from e
        return z85.decode(public)
    raise ValueError(f"curve key {text!r:.60} is neither a Z85 public key (40 characters) nor a certificate file "
                     f"next to the keys file (make one with `fs-engine keys`)")


class CurveAuthenticator:
    """``zmq.auth`` on the frontend's context: admits a connection only if its client key is in ``keys``, and
    names the key's tenant as the connection's User-Id (what ``Router.last_user_id`` reads)."""

    def __init__(self, ctx: zmq.Context, keys: Keys) -> None:
        self.keys = keys
        self._auth = ThreadAuthenticator(ctx)
        self._auth.curve_user_id = self._tenant_of  # type: ignore[method-assign]
        self._auth.start()
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN.decode(), credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth asks this for every connecting client (``key``: its public key, Z85-encoded)."""
        return z85.decode(key) in self.keys.by_curve_key

    def _tenant_of(self, client_public_key: bytes) -> str:
        return self.keys.by_curve_key[client_public_key]

    def stop(self) -> None:
        self._auth.stop()


def make_certificates(directory: str | Path, names: list[str]) -> list[tuple[Path, Path]]:
    """CURVE key pairs ``NAME.key`` (public: give it to the other side) and ``NAME.key_secret`` (keep it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"a certificate name is a plain file name, got {name!r}")
        if (directory / f"{name}.key_secret").exists():
            raise ValueError(f"{directory / name}.key_secret exists already: choose another name or remove it")
        public, secret = zmq.auth.create_certificates(str(directory), name)
        Path(secret).chmod(0o600)
        made.append((Path(public), Path(secret)))
    return made


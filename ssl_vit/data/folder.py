"""A folder of images as it sits on disk: what is in it, what is skipped, and whether it has labels.

The walk is recursive and deterministic (names sorted at every level). Symlinks are followed, but a
folder is entered once: a folder reached again through a link (a loop such as `a/b -> ..`, or two
links to one place) is skipped and counted, so a loop cannot hang the walk. Real folders are walked
before linked ones, so a folder inside the tree keeps its own name (and class). Hidden entries (a name
starting with a dot) and files without an image extension are skipped and counted too, so the
one-line report accounts for everything the walk saw.

Labels (`--labels`): `folders` takes the first-level sub-folder of each image as its class (an image
at the top level is then an error, never silently dropped); `none` gives no labels; `auto` picks
`folders` when every image sits in a first-level sub-folder and there are at least two of them,
else `none` (one sub-folder is not a labelling, and images at the top level have no class).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ssl_vit.errors import DataError

SOURCE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
LABEL_MODES = ("auto", "folders", "none")


@dataclass
class Listing:
    """The images under `root`: (relative POSIX path, size, mtime in ns), sorted by path."""

    root: Path
    files: list[tuple[str, int, int]] = field(default_factory=list)
    hidden: int = 0
    not_images: int = 0
    repeated_folders: int = 0  # reached again through a symlink (loops included): skipped
    unreadable: int = 0  # broken links, folders that cannot be listed

    def fingerprint(self) -> str:
        """Changes when any image is added, removed, renamed, resized or touched."""
        return hashlib.sha256(json.dumps(self.files).encode()).hexdigest()

    def skipped(self) -> dict[str, int]:
        return {
            "hidden": self.hidden,
            "not_images": self.not_images,
            "repeated_folders": self.repeated_folders,
            "unreadable_entries": self.unreadable,
        }

    def report(self) -> str:
        """One line: how many images, and what the walk skipped (only the non-zero counts)."""
        names = {
            "hidden": "hidden",
            "not_images": "not images",
            "repeated_folders": "folder(s) seen before (symlink loop)",
            "unreadable_entries": "unreadable entries (broken links)",
        }
        parts = [f"{n} {names[k]}" for k, n in self.skipped().items() if n]
        return f"{self.root}: {len(self.files)} images" + (f"; skipped {', '.join(parts)}" if parts else "")


def list_images(root: Path) -> Listing:
    """Walk `root` (see the module docstring); a one-line `DataError` when it holds no image."""
    listing = Listing(root)
    seen: set[tuple[int, int]] = set()
    stack: list[Path] = [Path()]
    links: list[Path] = []  # walked after the real folders, so a folder keeps its real path
    while stack or links:
        rel = stack.pop() if stack else links.pop(0)
        try:
            info = os.stat(root / rel)
            with os.scandir(root / rel) as scan:
                entries = sorted(scan, key=lambda e: e.name, reverse=True)  # popped in name order
        except OSError:
            listing.unreadable += 1
            continue
        if (info.st_dev, info.st_ino) in seen:
            listing.repeated_folders += 1
            continue
        seen.add((info.st_dev, info.st_ino))
        for entry in entries:
            _visit(entry, rel, listing, stack, links)
    if not listing.files:
        raise DataError(f"{root}: no images found ({', '.join(SOURCE_EXTS)}); {listing.report()}")
    listing.files.sort()
    return listing


def _visit(
    entry: os.DirEntry[str], rel: Path, listing: Listing, stack: list[Path], links: list[Path]
) -> None:
    if entry.name.startswith("."):
        listing.hidden += 1
        return
    try:
        if entry.is_dir():  # follows symlinks; `list_images` enters each folder once
            (links if entry.is_symlink() else stack).append(rel / entry.name)
            return
        if not entry.is_file():
            listing.unreadable += 1  # a broken link, a socket, a device
            return
        if Path(entry.name).suffix.lower() not in SOURCE_EXTS:
            listing.not_images += 1
            return
        info = entry.stat()
    except OSError:
        listing.unreadable += 1
        return
    listing.files.append(((rel / entry.name).as_posix(), info.st_size, info.st_mtime_ns))


def folder_labels(listing: Listing, mode: str) -> tuple[list[int], list[str], str]:
    """Per-image class index (-1: none), class names, and a phrase saying what was decided and why."""
    if mode not in LABEL_MODES:
        raise DataError(f"--labels must be one of {', '.join(LABEL_MODES)}, not '{mode}'")
    paths = [path for path, _, _ in listing.files]
    top = [p for p in paths if "/" not in p]
    classes = sorted({p.split("/", 1)[0] for p in paths if "/" in p})
    if mode == "folders" and top:
        raise DataError(
            f"{listing.root}: {len(top)} image(s) sit at the top level, outside any class folder "
            f"(e.g. {top[0]}); move them into a class folder, or use --labels none"
        )
    if mode == "none" or (mode == "auto" and (top or len(classes) < 2)):
        if mode == "none":
            why = "--labels none"
        elif top:
            why = f"{len(top)} image(s) at the top level, {len(paths) - len(top)} in sub-folders"
        else:
            why = f"all in the one sub-folder '{classes[0]}'; --labels folders makes it a class"
        return [-1] * len(paths), [], f"labels: none ({why})"
    index = {name: i for i, name in enumerate(classes)}
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    return (
        [index[p.split("/", 1)[0]] for p in paths],
        classes,
        f"labels: {len(classes)} class folders ({shown})",
    )

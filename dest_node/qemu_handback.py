"""dest-node --to-qemu FILE: a guest that came from QEMU goes back to QEMU as a migration stream.

Written once the migration is verified and committed (the guest is this node's), so that QEMU
started with `-incoming "exec:cat FILE"` loads exactly what the verification proved arrived.
Written to a temporary file first and renamed, so a reader never sees half a stream.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.guest.guest import Guest
from common.qemu.guest_io import export_stream
from common.qemu.stream import StreamError, write_stream


class QemuHandback:
    def __init__(self, path: str, log: Any) -> None:
        self.path = Path(path)
        self.log = log
        self.written_bytes: int | None = None
        self.error: str | None = None

    @property
    def done(self) -> bool:
        return self.written_bytes is not None or self.error is not None

    def hand_back(self, guest: Guest) -> None:
        """Write the guest's stream (once); a guest that never came from QEMU is an error."""
        if self.done:
            return
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            stream = export_stream(guest)
            with partial.open("wb") as out:
                self.written_bytes = write_stream(out, stream)
            os.replace(partial, self.path)
        except (StreamError, OSError, MemoryError) as exc:
            self.written_bytes = None
            self.error = f"cannot write the QEMU stream {self.path}: {exc}"
            partial.unlink(missing_ok=True)
            self.log.error("guest not handed back to QEMU", reason=self.error)
            return
        self.log.info(
            "guest handed back to QEMU",
            stream=str(self.path),
            bytes=self.written_bytes,
            resume_with=f'qemu-system-aarch64 -M virt,mte=on -cpu max ... -incoming "exec:cat {self.path}"',
        )

    def refuse(self, reason: str) -> None:
        if not self.done:
            self.error = reason
            self.log.error("guest not handed back to QEMU", reason=reason)

    def report(self) -> dict[str, Any]:
        return {"path": str(self.path), "bytes": self.written_bytes, "error": self.error}

"""``save_to_disk``: each message as a file, the body byte for byte, written durably.

The file is written under a temporary name, fsynced, renamed into place and the directory
fsynced, so a crash leaves either the whole file or none; only then is the message acked. The
default name is made of the webhook and message ids, so a redelivery rewrites the same file
instead of adding a second one (a pattern with ``{uuid}`` or ``{timestamp}`` gives that up).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from pathlib import Path
from typing import ClassVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from webhook_connect.shared.modules.base import Message, Module, Permanent, Transient

PLACEHOLDERS = frozenset({"webhook_id", "message_id", "channel", "timestamp", "date", "uuid"})
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SaveToDiskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    filename_pattern: str = "{webhook_id}-{message_id}"
    file_extension: str = Field(default=".json", pattern=r"^(\.[A-Za-z0-9]{1,16})?$")
    include_headers: bool = False

    @field_validator("filename_pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        names = set(re.findall(r"{([^{}]*)}", value))
        unknown = names - PLACEHOLDERS
        if unknown:
            known = ", ".join("{" + n + "}" for n in sorted(PLACEHOLDERS))
            raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}}; use {known}")
        if "/" in value or "\\" in value or value.startswith("."):
            raise ValueError("a file name, not a path: no '/', '\\' or leading '.'")
        return value


class SaveToDiskModule(Module[SaveToDiskConfig]):
    name = "save_to_disk"
    Config: ClassVar[type[BaseModel]] = SaveToDiskConfig

    async def start(self) -> None:
        try:
            await asyncio.to_thread(Path(self.config.path).mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise Transient(f"cannot create {self.config.path}: {exc}") from exc

    async def deliver(self, message: Message) -> None:
        name = self.file_name(message)
        await asyncio.to_thread(self._write, name, message)

    def file_name(self, message: Message) -> str:
        now = time.time()
        name = self.config.filename_pattern.format(
            webhook_id=message.webhook_id,
            message_id=message.message_id,
            channel=message.channel,
            timestamp=f"{now:.6f}",
            date=time.strftime("%Y-%m-%d", time.gmtime(now)),
            uuid=uuid.uuid4().hex,
        )
        extension = self.config.file_extension
        if extension and not name.endswith(extension):
            name += extension
        if not SAFE_NAME.match(name):
            raise Permanent(f"file name {name!r} is not a safe file name")
        return name

    def _write(self, name: str, message: Message) -> None:
        directory = Path(self.config.path)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            _write_durably(directory / name, message.body)
            if self.config.include_headers:
                meta = orjson.dumps(message.metadata(), option=orjson.OPT_INDENT_2)
                _write_durably(directory / f"{name}.headers.json", meta)
            descriptor = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError as exc:  # a full or read-only disk may recover; an operator can fix it
            raise Transient(f"cannot write {directory / name}: {exc}") from exc


def _write_durably(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)

"""Client system shared memory: registered regions, their leases, and the windows requests use.

A client on the same machine puts a tensor into a POSIX shared memory object, registers a
window of it (name, key, offset, byte size) and then names the region in an inference request
instead of sending the bytes (docs/protocol.md#shared-memory). Why it is shaped like this:

- The server opens a key with its own rights: any client that reaches the gRPC port can read
  and write every object the server's user can open, so the boundary is the port
  (docs/limits.md#shared-memory). Objects owned by other users are not refused: clients in
  another container or run by another user share /dev/shm that way, and the mode applies.
- Off by default (`--allow-client-shm`): the register/unregister RPCs answer UNIMPLEMENTED, the
  status RPCs answer with nothing registered, as tritonserver does.
- A key names a shared memory object, never a path: a plain name with an optional leading
  "/", opened under /dev/shm through a directory descriptor with O_NOFOLLOW (no symlink is
  followed) and O_NONBLOCK (a FIFO cannot hang the handler), then required to be a regular
  file whose real size (fstat) covers the window. Only the window is mapped (from the page
  below its offset), read-write because outputs are written into it.
- `--client-shm-key-prefix`: only objects whose name starts with it may be registered; others
  are INVALID_ARGUMENT (the rule, not the object, refuses them: nothing is opened, so the
  answer says nothing about which objects exist). Without it, any object the server's user
  can open is reachable by any gRPC client (docs/limits.md#shared-memory).
- At most `MAX_REGIONS` regions, and at most `max_bytes` bytes mapped at once
  (`--client-shm-max-bytes`, docs/limits.md): a sparse object can be ftruncate'd to terabytes
  without using memory, and without this bound a few dozen registrations of one exhaust the
  process's address space, after which any allocation (a request's buffer) fails. Regions
  that were unregistered but are still in use count until they are unmapped.
- A request holds a lease on each region it names from validation until its reply is built.
  Unregistering removes the name at once (later requests get NOT_FOUND) but unmaps only when
  the last lease is released; numpy views of the mapping also keep it alive (Python refuses
  to close a mapping with exported buffers, and then the last view unmaps it), so an
  in-flight request can never read or write unmapped memory.
- CUDA shared memory is not served: CudaSharedMemoryRegister answers tritonserver's CPU-only
  text; unregister and status succeed with nothing registered.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass

from .constants import DEFAULT_CLIENT_SHM_MAX_BYTES, SHOWN_NAME_CHARS
from .errors import (
    AlreadyExists,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unimplemented,
    shown,
)

log = logging.getLogger("tributary.shm")

SHM_DIR = "/dev/shm"
MAX_REGIONS = 1024
"""Registered system shared memory regions; one more is RESOURCE_EXHAUSTED."""
MAX_BYTES = DEFAULT_CLIENT_SHM_MAX_BYTES
"""Bytes of client shared memory mapped at once (`--client-shm-max-bytes`); see docs/limits.md."""
MAX_NAME = SHOWN_NAME_CHARS
"""Characters in a region name or key (a POSIX shm name is at most 255 bytes anyway)."""
DISABLED = (
    "Client shared memory is disabled. Start the server with '--allow-client-shm=true' to enable."
)


@dataclass(eq=False)
class Region:
    """One registered window: `byte_size` bytes of object `key` from `offset`."""

    name: str
    key: str
    offset: int
    byte_size: int
    _map: mmap.mmap
    _base: int  # where the window starts inside the mapping (the mapping starts on a page)
    _leases: int = 0
    _gone: bool = False  # unregistered: unmap when the last lease goes

    def window(self, offset: int, size: int) -> memoryview:
        """`size` bytes from `offset` into the region; the caller checked the bounds."""
        start = self._base + offset
        return memoryview(self._map)[start : start + size]

    def _unmap(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a view is still alive: the last one unmaps it
            log.debug("shared memory region '%s' unmapped with its last view", self.name)


class Leases:
    """The regions one request uses; `release` is idempotent."""

    __slots__ = ("_owner", "_regions")

    def __init__(self, owner: SharedMemory) -> None:
        self._owner = owner
        self._regions: list[Region] = []

    def acquire(self, name: str) -> Region:
        region = self._owner._acquire(name)
        self._regions.append(region)
        return region

    def release(self) -> None:
        regions, self._regions = self._regions, []
        for region in regions:
            self._owner._release(region)


def _open_error(key: str) -> Internal:
    return Internal(f"Unable to open shared memory region: '{shown(key)}'")


def _open_object(directory: str, key: str) -> int:
    """A read-write descriptor of shared memory object `key`, which must be a regular file."""
    name = key[1:] if key.startswith("/") else key
    if (
        not name
        or "/" in name
        or ".." in name
        or "\0" in name
        or name == "."
        or len(name.encode("utf-8", "surrogatepass")) > 255
    ):
        raise _open_error(key)
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, ValueError) as exc:
        log.info("cannot open shared memory key %r: %s", key[:MAX_NAME], exc)
        raise _open_error(key) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _open_error(key)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map(fd: int, key: str, offset: int, byte_size: int) -> tuple[mmap.mmap, int]:
    """Map the window read-write from the page below `offset`; also where it starts in the map."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mapped = mmap.mmap(
            fd,
            offset - start + byte_size,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start,
        )
    except (OSError, ValueError, OverflowError) as exc:
        log.info("cannot map shared memory key %r: %s", key, exc)
        raise _open_error(key) from None
    return mapped, offset - start


class SharedMemory:
    """The registered system shared memory regions of one server (thread-safe)."""

    def __init__(
        self,
        enabled: bool,
        *,
        max_regions: int = MAX_REGIONS,
        max_bytes: int = MAX_BYTES,
        key_prefix: str | None = None,
        directory: str = SHM_DIR,
    ) -> None:
        self.enabled = enabled
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.key_prefix = key_prefix
        self.directory = directory
        self._lock = threading.Lock()
        self._regions: dict[str, Region] = {}
        self._mapped = 0  # byte_size of every region not yet unmapped (registered or in use)

    # -- RPCs ------------------------------------------------------------------------------

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not self.enabled:
            raise Unimplemented(DISABLED)
        if not name or len(name) > MAX_NAME:
            raise InvalidArgument(
                f"failed to register shared memory region '{shown(name)}': the name must be "
                f"1 to {MAX_NAME} characters long"
            )
        if len(key) > MAX_NAME:
            raise _open_error(key)
        with self._lock:  # cheap refusals before any file is opened
            self._check_room(name)
        if byte_size <= 0:
            raise InvalidArgument(
                f"failed to register shared memory region '{shown(name)}': byte_size must be "
                "greater than 0"
            )
        object_name = key[1:] if key.startswith("/") else key
        if self.key_prefix is not None and not object_name.startswith(self.key_prefix):
            raise InvalidArgument(
                f"failed to register shared memory region '{shown(name)}': key '{shown(key)}' "
                f"does not start with '{self.key_prefix}' (--client-shm-key-prefix)"
            )
        fd = _open_object(self.directory, key)
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidArgument(
                    f"failed to register shared memory region '{shown(name)}': offset {offset} "
                    f"+ byte_size {byte_size} exceeds the {size} bytes of '{shown(key)}'"
                )
            self._reserve(name, byte_size)  # before mapping: the address space is what it guards
            try:
                mapped, base = _map(fd, key, offset, byte_size)
            except BaseException:
                self._unreserve(byte_size)
                raise
        finally:
            os.close(fd)
        region = Region(name, key, offset, byte_size, mapped, base)
        with self._lock:
            try:
                self._check_room(name)
            except BaseException:
                self._mapped -= byte_size
                region._unmap()
                raise
            self._regions[name] = region
        log.debug("registered shared memory region '%s' (key %r, %d bytes)", name, key, byte_size)

    def _reserve(self, name: str, byte_size: int) -> None:
        with self._lock:
            if self._mapped + byte_size > self.max_bytes:
                raise ResourceExhausted(
                    f"failed to register shared memory region '{shown(name)}': {byte_size} more "
                    f"bytes would exceed the {self.max_bytes} bytes of shared memory the server "
                    f"maps at once (--client-shm-max-bytes; {self._mapped} mapped now)"
                )
            self._mapped += byte_size

    def _unreserve(self, byte_size: int) -> None:
        with self._lock:
            self._mapped -= byte_size

    def _check_room(self, name: str) -> None:
        if name in self._regions:
            raise AlreadyExists(f"shared memory region '{shown(name)}' already in manager")
        if len(self._regions) >= self.max_regions:
            raise ResourceExhausted(
                f"failed to register shared memory region '{shown(name)}': the server allows "
                f"{self.max_regions} registered regions"
            )

    def unregister(self, name: str) -> None:
        """Remove `name` ("" = every region); unknown names are not an error (Triton's rule)."""
        if not self.enabled:
            raise Unimplemented(DISABLED)
        self._remove(name)

    def _remove(self, name: str) -> None:
        with self._lock:
            if name:
                found = self._regions.pop(name, None)
                gone = [found] if found is not None else []
            else:
                gone = list(self._regions.values())
                self._regions.clear()
            idle = []
            for region in gone:
                region._gone = True
                if region._leases == 0:
                    idle.append(region)
                    self._mapped -= region.byte_size
        for region in idle:
            region._unmap()
        for region in gone:
            log.debug("unregistered shared memory region '%s'", region.name)

    def status(self, name: str) -> list[Region]:
        with self._lock:
            if not name:
                return list(self._regions.values())
            region = self._regions.get(name)
        if region is None:
            raise NotFound(f"Unable to find system shared memory region: '{shown(name)}'")
        return [region]

    def close(self) -> None:
        """Shutdown: unregister everything (regions still in use unmap with their last lease)."""
        self._remove("")

    # -- CUDA shared memory: not served ------------------------------------------------------

    def cuda_register(self, name: str) -> None:
        if not self.enabled:
            raise Unimplemented(DISABLED)
        raise InvalidArgument(
            f"failed to register CUDA shared memory region: '{shown(name)}', GPUs not supported"
        )

    def cuda_unregister(self, name: str) -> None:
        if not self.enabled:
            raise Unimplemented(DISABLED)

    @staticmethod
    def cuda_status(name: str) -> None:
        if name:
            raise NotFound(f"Unable to find cuda shared memory region: '{shown(name)}'")

    # -- requests --------------------------------------------------------------------------

    def leases(self) -> Leases:
        return Leases(self)

    def _acquire(self, name: str) -> Region:
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise NotFound(f"Unable to find shared memory region: '{shown(name)}'")
            region._leases += 1
            return region

    def _release(self, region: Region) -> None:
        with self._lock:
            region._leases -= 1
            unmap = region._gone and region._leases == 0
            if unmap:
                self._mapped -= region.byte_size
        if unmap:
            region._unmap()

"""The running parts of one service, as the lifespan wires them and the routes reach them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from service.config import Settings
from service.events import EventBus
from service.inbox.watcher import InboxWatcher
from service.models.host import ModelHost
from service.store.files import StoredFiles
from service.store.profiles import Profiles
from service.store.queue import Queue
from service.store.reads import Reads
from service.worker import Worker


@dataclass
class Services:
    settings: Settings
    queue: Queue
    reads: Reads
    host: ModelHost
    worker: Worker
    started: float
    profiles: Profiles
    inbox: InboxWatcher | None = None
    events: EventBus = field(default_factory=EventBus)
    # Uploads decoded at once: each holds its bytes and a decoded image in memory.
    intake_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(4))
    stored_files: StoredFiles | None = None  # the store's; None: as the settings call for

    @property
    def files(self) -> StoredFiles:
        """Images and redacted copies, reachable from this node whichever node wrote them."""
        if self.stored_files is None:
            self.stored_files = StoredFiles.of(self.settings, self.queue)
        return self.stored_files

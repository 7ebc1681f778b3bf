"""The virtual transport: a modelled cluster under the real server loop, on a clock the time model advances.

Every worker is a plain object in this process (a ``ShardWorker``). A command's answer is computed for real the
moment it is sent, on the weights it was sent with; what is simulated is only *when* it reaches the server, from
the time model (``core.time_model``). ``now()`` is the server's virtual clock, so the loop's times are virtual
seconds, and the staleness, the order of arrivals and the dropped answers are those of the modelled cluster.

One command's life, each step one formula:

- the server's link is full duplex: commands queue FIFO on its egress, answers on its ingress, each occupying
  it for bytes x 8 / bandwidth; latency is added on the worker's side (command: link, then latency; answer:
  latency, then link). Nodes hold ``workers_per_node`` workers; node 0 also holds the server, and its workers'
  messages skip the network (``workers_per_node`` None: the server has a node of its own);
- the worker computes ``compute_s x its speed factor``, on a core of its own, or with ``cores`` C sharing C
  cores equally with the other computing workers and the working server (processor sharing); then it waits
  the straggler's extra (``stragglers.extra_delay_s`` of that modelled compute time: slowdown and the delay
  keyed by (seed, worker, step)) and any injected delay: waits hold no core;
- the server handles answers FIFO, one at a time: t = max(t, arrival) + server_answer_s; each update (every
  publish after the first) adds server_update_s.

Each worker has one command slot, so computing its answer at send time is exact. The events live in one heap
that ``receive`` pulls in time order (simpy, the obvious alternative, pushes and has no processor sharing).

What the model leaves out: queueing on the other nodes' own links (only the server's link is shared), latency
jitter and message headers, the server's cost of sending a command, contention for memory bandwidth and caches,
and a lost worker's detection time (a loss is noticed when it happens, an idle worker's when it is next
sent a command).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import torch

from sgd_dist.config import StragglersConfig
from sgd_dist.core.compression import Compressed
from sgd_dist.core.time_model import TimeProfile, compute_s, message_s, server_answer_s, server_update_s
from sgd_dist.engine.delays import extra_delay_s, message_bytes
from sgd_dist.engine.messages import EVALUATE, GRADIENT, LOCAL, Arrival, Command, ServerEnd, WorkerLost

_KINDS = {GRADIENT: "gradient", LOCAL: "local", EVALUATE: "evaluate"}
# events: a command reaches its worker, its answer leaves the worker, the answer reaches the server, a worker dies
_START, _LEAVE, _ARRIVE, _LOSS = range(4)
_QUEUED, _COMPUTING, _WAITING, _SENT = range(4)  # a job's phases
MessageBytes = Callable[[int, int, int], tuple[int, int]]  # (dim, itemsize, kind) -> (command, answer) bytes


class _Job:
    """One command on its way: the answer already computed, the work it models, where it is now."""

    __slots__ = ("answer", "answer_bytes", "delay_s", "done_s", "killed", "phase", "start_s", "work_s", "worker")

    def __init__(self, worker: int, answer: Arrival | None, work_s: float, delay_s: float = 0.0,
                 answer_bytes: int = 0) -> None:
        self.worker, self.answer, self.work_s, self.delay_s = worker, answer, work_s, delay_s
        self.answer_bytes = answer_bytes
        self.start_s, self.phase, self.killed, self.done_s = 0.0, _QUEUED, False, None


class _Link:
    """One direction of the server's link: messages cross it one at a time, in the order they reach it."""

    def __init__(self, bandwidth_bps: float | None) -> None:
        self.bandwidth_bps, self.free_s = bandwidth_bps, 0.0

    def cross(self, reach_s: float, nbytes: int) -> float:
        """When a message of ``nbytes`` reaching the link at ``reach_s`` (never earlier than the last) is across."""
        if self.bandwidth_bps is None:
            return reach_s
        self.free_s = max(reach_s, self.free_s) + message_s(0.0, self.bandwidth_bps, nbytes)
        return self.free_s


class _OwnCores:
    """Every process on a core of its own: a job ends its work seconds after it starts."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Job]] = []
        self._seq = 0

    def add(self, now: float, work_s: float, job: _Job) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (now + work_s, self._seq, job))

    def remove(self, now: float, job: _Job) -> None:
        """``job`` stops computing now (its process died); the caller marks it killed, its entry goes lazily."""

    def next_s(self) -> float:
        while self._heap and self._heap[0][2].killed:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else math.inf

    def pop(self) -> tuple[float, _Job]:
        end_s, _, job = heapq.heappop(self._heap)
        return end_s, job


class _SharedCores(_OwnCores):
    """``cores`` cores shared equally by the running jobs (processor sharing), O(log jobs) per event.

    With n jobs each runs at min(1, cores / n) of a core; ``work`` counts the seconds of work one job has been
    given since the start, so a job that starts at work W with w seconds to do ends when ``work`` reaches W + w:
    the heap is keyed by that, and only the head's end time is ever computed.
    """

    def __init__(self, cores: int) -> None:
        super().__init__()
        self.cores, self.running, self.work, self.clock_s = cores, 0, 0.0, 0.0

    def _rate(self) -> float:
        return min(1.0, self.cores / self.running) if self.running else 1.0

    def _advance(self, now: float) -> None:
        self.work += (now - self.clock_s) * self._rate() if self.running else 0.0
        self.clock_s = now

    def add(self, now: float, work_s: float, job: _Job) -> None:
        self._advance(now)
        self.running += 1
        self._seq += 1
        heapq.heappush(self._heap, (self.work + work_s, self._seq, job))

    def remove(self, now: float, job: _Job) -> None:
        self._advance(now)
        self.running -= 1

    def next_s(self) -> float:
        while self._heap and self._heap[0][2].killed:
            heapq.heappop(self._heap)
        return self.clock_s + (self._heap[0][0] - self.work) / self._rate() if self._heap else math.inf

    def pop(self) -> tuple[float, _Job]:
        end_s = self.next_s()
        end_work, _, job = heapq.heappop(self._heap)
        self.clock_s, self.work, self.running = end_s, max(self.work, end_work), self.running - 1
        return end_s, job


class VirtualServerEnd(ServerEnd):
    """The server's end of a virtual cluster (see the module docstring for the model).

    Args:
        workers: objects with ``execute(command, weights) -> Arrival``, built without stragglers, network or
            injected delays (this transport models them; the workers would sleep for real).
        profile: the time model's coefficients.
        latency_s, bandwidth_bps: one link's latency (seconds) and bandwidth (bits per second, None: unlimited).
        workers_per_node: workers per node; node 0 holds the server and workers 0 .. m - 1 (None: no worker
            shares the server's node).
        cores: cores shared by every computing process (None: a core each).
        speed_factors: per worker, what its compute time is multiplied by (2.0: half as fast); None: all 1.
        stragglers: the stragglers section (slowdowns and keyed delays), or None.
        delays: worker -> {local step: seconds}: injected one-off waits (the ``delay`` fault).
        start_s: where the clock starts (a restarted server goes on with the run's time).
        message_bytes: (dim, itemsize, kind) -> (command bytes, answer bytes): the payload sizes' one seam.
    """

    name = "virtual"

    def __init__(
        self, workers: Sequence, profile: TimeProfile, *, latency_s: float = 0.0, bandwidth_bps: float | None = None,
        workers_per_node: int | None = None, cores: int | None = None, speed_factors: Sequence[float] | None = None,
        stragglers: StragglersConfig | None = None, delays: Mapping[int, Mapping[int, float]] | None = None,
        start_s: float = 0.0, message_bytes: MessageBytes = message_bytes,
    ) -> None:
        _check_arguments(workers, latency_s, bandwidth_bps, workers_per_node, cores, speed_factors)
        self.workers, self.profile, self.latency_s = workers, profile, latency_s
        self.local_workers = 0 if workers_per_node is None else workers_per_node
        self.speed_factors = [1.0] * len(workers) if speed_factors is None else [float(f) for f in speed_factors]
        self.stragglers, self.message_bytes = stragglers, message_bytes
        self.delays = {w: dict(d) for w, d in (delays or {}).items()}
        self.weights: torch.Tensor | None = None
        self.version = 0
        self.t = start_s
        self._egress, self._ingress = _Link(bandwidth_bps), _Link(bandwidth_bps)
        self._cores = _OwnCores() if cores is None else _SharedCores(cores)
        self._events: list[tuple[float, int, int, object]] = []  # (time, seq, event, job or worker)
        self._seq = 0
        self._arrived: deque[tuple[float, _Job | WorkerLost]] = deque()  # at the server, in arrival order
        self._jobs: dict[int, _Job] = {}  # each worker's command in flight
        self._dead: set[int] = set()
        self._unnoticed: dict[int, float] = {}  # worker -> when it died idle: noticed when it is next sent a command

    # -- the ServerEnd interface ------------------------------------------------------------------------------
    def now(self) -> float:
        """The server's virtual clock, in seconds."""
        return self.t

    def publish(self, version: int, weights: torch.Tensor) -> None:
        first = self.weights is None
        # a copy: the server updates its weights in place, and a command uses the version it was sent with
        self.version, self.weights = version, weights.clone()
        if not first:  # the first publish is the start (or a restart), not an update
            self._serve(server_update_s(self.profile, weights.numel()))

    def send(self, worker: int, command: Command, weights: torch.Tensor | None = None) -> None:
        assert weights is not None or command.version == self.version, (command, self.version)
        if worker in self._unnoticed:  # it died idle: the command is lost with it, which is how the server notices
            self._arrived.append((self.t, _notice(worker, self._unnoticed.pop(worker))))
            return
        weights = self.weights if weights is None else weights
        answer = self.workers[worker].execute(command, weights)
        sent_bytes, answer_bytes = self.message_bytes(weights.numel(), weights.element_size(), command.kind)
        sent_bytes = weights.nbytes if isinstance(weights, Compressed) else sent_bytes  # compressed weights (down)
        answer_bytes = answer.nbytes or answer_bytes  # what the answer carries, a compressed payload's size included
        steps = command.local_steps if command.kind == LOCAL else 1
        work_s = compute_s(self.profile, _KINDS[command.kind], answer.count // steps, weights.numel(), steps)
        delay_s = 0.0 if command.kind == EVALUATE else self.delays.get(worker, {}).pop(command.step, 0.0)
        job = _Job(worker, answer, work_s * self.speed_factors[worker], delay_s, answer_bytes)
        self._jobs[worker] = job
        reach_s = self.t if worker < self.local_workers else self._egress.cross(self.t, sent_bytes) + self.latency_s
        self._push(reach_s, _START, job)

    def receive(self, timeout: float | None = None) -> Arrival | None:
        deadline = math.inf if timeout is None else self.t + timeout
        got = self._next_arrival(deadline)
        if got is None:  # nothing before the deadline: the time passed all the same
            self.t = deadline
            return None
        arrived_s, item = got
        self.t = max(self.t, arrived_s)
        if isinstance(item, WorkerLost):
            raise item
        del self._jobs[item.worker]
        self._serve(server_answer_s(self.profile, item.answer_bytes))
        return item.answer

    def forget(self, worker: int) -> None:
        job = self._jobs.pop(worker, None)
        if job is not None:
            self._kill(self.t, job)

    def close(self) -> None:
        self._events.clear()
        self._arrived.clear()
        self._jobs.clear()

    # -- faults -------------------------------------------------------------------------------------------------
    def lose(self, worker: int, at_s: float | None = None) -> None:
        """Worker ``worker`` dies at virtual time ``at_s`` (None: now): what it had not answered yet is lost. The
        server notices at once if it was waiting for the worker (``receive`` raises WorkerLost in its turn among
        the arrivals), else when it next sends it a command, as the real transports notice."""
        at_s = self.t if at_s is None else at_s
        if at_s < self.t:
            raise ValueError(f"a loss at {at_s} s is in the past (the clock is at {self.t} s)")
        self._push(at_s, _LOSS, worker)

    def start_replacement(self, worker: int) -> Callable[[], bool]:
        """Start replacing lost ``worker``: returns ``ready()``, True from replacement_s of virtual time on (the
        loop's ``LoopHooks.recover``)."""
        ready_s = self.t + self.profile.replacement_s

        def ready() -> bool:
            if self.t < ready_s:
                return False
            self._dead.discard(worker)
            return True

        return ready

    # -- the event engine -------------------------------------------------------------------------------------
    def _push(self, at_s: float, event: int, item: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at_s, self._seq, event, item))

    def _next_s(self) -> float:
        return min(self._events[0][0] if self._events else math.inf, self._cores.next_s())

    def _step(self) -> None:
        """Process the earliest event: a message's, or the end of some process's work."""
        if self._events and self._events[0][0] <= self._cores.next_s():
            at_s, _, event, item = heapq.heappop(self._events)
            if event == _START:
                self._started(at_s, item)
            elif event == _LEAVE:
                self._leave(at_s, item)
            elif event == _ARRIVE:
                if not item.killed:
                    self._arrived.append((at_s, item))
            else:
                self._lost(at_s, item)
        else:
            at_s, job = self._cores.pop()
            self._computed(at_s, job)

    def _next_arrival(self, deadline: float) -> tuple[float, _Job | WorkerLost] | None:
        """The earliest answer (or loss notice) at the server, if it is there by ``deadline``."""
        while True:
            while self._arrived:
                arrived_s, item = self._arrived.popleft()
                if not (isinstance(item, _Job) and item.killed):
                    return arrived_s, item
            next_s = self._next_s()
            if next_s > deadline:
                return None
            if next_s == math.inf:
                raise RuntimeError("receive() with no command in flight would wait forever")
            self._step()

    def _serve(self, work_s: float) -> None:
        """The server works ``work_s`` seconds (sharing the cores, if they are shared) from now."""
        if work_s <= 0:
            return
        while self._next_s() <= self.t:  # the cores must see every event up to now
            self._step()
        job = _Job(-1, None, work_s)
        self._cores.add(self.t, work_s, job)
        while job.done_s is None:
            self._step()
        self.t = job.done_s

    def _started(self, at_s: float, job: _Job) -> None:
        if job.killed:
            return
        if job.worker in self._dead:  # sent to a worker that had died: lost with it
            job.killed = True
            return
        job.start_s, job.phase = at_s, _COMPUTING
        self._cores.add(at_s, job.work_s, job)

    def _computed(self, at_s: float, job: _Job) -> None:
        job.phase = _WAITING
        if job.worker < 0:  # the server's own work
            job.done_s = at_s
            return
        wait_s = job.delay_s
        if self.stragglers is not None and job.answer.kind != EVALUATE:
            wait_s += extra_delay_s(self.stragglers, job.worker, job.answer.step, at_s - job.start_s)
        if wait_s > 0:
            self._push(at_s + wait_s, _LEAVE, job)
        else:
            self._leave(at_s, job)

    def _leave(self, at_s: float, job: _Job) -> None:
        if job.killed:
            return
        job.phase = _SENT
        a = job.answer  # seconds: the worker's own time, as real transports say (built directly: replace() is slow)
        job.answer = Arrival(a.worker, a.kind, a.step, a.version, a.grad, a.loss, a.count, at_s - job.start_s, a.nbytes)
        if job.worker < self.local_workers:
            self._push(at_s, _ARRIVE, job)
        else:
            self._push(self._ingress.cross(at_s + self.latency_s, job.answer_bytes), _ARRIVE, job)

    def _lost(self, at_s: float, worker: int) -> None:
        if worker in self._dead:  # dead already: its replacement is not up yet
            return
        self._dead.add(worker)
        job = self._jobs.get(worker)
        if job is None:  # idle: nothing of it is awaited, so nothing shows the loss yet
            self._unnoticed.setdefault(worker, at_s)
            return
        if job.phase != _SENT:  # an answer already on the wire still arrives
            self._kill(at_s, job)
        self._arrived.append((at_s, _notice(worker, at_s)))

    def _kill(self, at_s: float, job: _Job) -> None:
        if job.killed:
            return
        if job.phase == _COMPUTING:
            self._cores.remove(at_s, job)
        job.killed = True


def _notice(worker: int, at_s: float) -> WorkerLost:
    return WorkerLost(f"worker {worker} was lost at {at_s:.6g} s (virtual)", worker)


def _check_arguments(workers: Sequence, latency_s: float, bandwidth_bps: float | None, workers_per_node: int | None,
                     cores: int | None, speed_factors: Sequence[float] | None) -> None:
    """ValueError naming the argument that does not fit."""
    if not workers:
        raise ValueError("VirtualServerEnd needs at least one worker")
    if not (math.isfinite(latency_s) and latency_s >= 0):
        raise ValueError(f"latency_s must be >= 0 (got {latency_s!r})")
    if bandwidth_bps is not None and not bandwidth_bps > 0:
        raise ValueError(f"bandwidth_bps must be > 0 or None for unlimited (got {bandwidth_bps!r})")
    if workers_per_node is not None and workers_per_node < 1:
        raise ValueError(f"workers_per_node must be >= 1 or None (got {workers_per_node!r})")
    if cores is not None and cores < 1:
        raise ValueError(f"cores must be >= 1 or None for a core each (got {cores!r})")
    if speed_factors is not None:
        if len(speed_factors) != len(workers):
            raise ValueError(f"speed_factors needs one factor per worker ({len(workers)}), got {len(speed_factors)}")
        bad = next((f for f in speed_factors if not (math.isfinite(f) and f > 0)), None)
        if bad is not None:
            raise ValueError(f"speed_factors must each be > 0 (got {bad!r})")
    for worker in workers:  # a worker that would sleep for real: this transport models these waits itself
        s = getattr(worker, "stragglers", None)
        if getattr(worker, "network", None) is not None or getattr(worker, "delays", None) or (
                s is not None and (s.slowdown or s.delay != "none")):
            raise ValueError(f"worker {getattr(worker, 'rank', '?')} was built with stragglers, a network or delays: "
                             "build it without them (the virtual transport models them)")

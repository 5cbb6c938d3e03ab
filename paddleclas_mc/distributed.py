"""Infer and eval split across the processes of ``python -m paddle.distributed.launch``.

The launcher starts one process per device (``--gpus``) or ``--nproc_per_node``
processes on CPU. It gives each process its rank in ``PADDLE_TRAINER_ID``, the
number of processes (the world size) in ``PADDLE_TRAINERS_NUM`` and the
address of a TCP key-value store, hosted by rank 0, in ``PADDLE_MASTER``.
Paddle's ``init_parallel_env`` builds its process groups on that store.

The processes here exchange their results through the store itself and never
form a process group (no ``init_parallel_env``, no collective op), because:

- with Paddle 3.3.1, the gloo process group that CPU processes get fails a
  collective op after about 30 seconds of waiting for another rank, whatever
  the value of ``PADDLE_PG_TIMEOUT`` (measured with two CPU processes). A
  rank can need longer than that to finish its share. Waits here poll the
  store, with a timeout of ``PADDLECLAS_MC_WAIT_TIMEOUT`` seconds.
- results exchanged through NCCL would pass through GPU memory.
- ``paddle.distributed.ParallelEnv().device_id``, which raises AttributeError
  in CPU processes with Paddle 3.3.1, is never read.

Paddle 3.3.1's store resets the connection on a value of 32 MiB (16 MiB
passed), so payloads travel in chunks of ``CHUNK_BYTES``. Each chunk is read
by exactly one rank, which empties it after reading, so the store in rank
0's memory keeps only small counters of what passed through.

Every rank must make the same sequence of exchange calls, since keys are
numbered by their position in that sequence.
"""

import dataclasses
import hashlib
import itertools
import os
import pickle
import time

__all__ = [
    "CHUNK_BYTES",
    "RANK_VARIABLE",
    "Ranks",
    "TIMEOUT_VARIABLE",
    "WORLD_SIZE_VARIABLE",
    "assign_batches",
    "check_same_images",
    "current_ranks",
]

RANK_VARIABLE = "PADDLE_TRAINER_ID"
WORLD_SIZE_VARIABLE = "PADDLE_TRAINERS_NUM"
MASTER_VARIABLE = "PADDLE_MASTER"

# How long one rank waits for another at an exchange, in seconds.
TIMEOUT_VARIABLE = "PADDLECLAS_MC_WAIT_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

CHUNK_BYTES = 4 << 20

_KEY_PREFIX = "paddleclas_mc"

# Numbers the Ranks of successive runs in one process (run_infer, then
# run_eval, say), so that their store keys differ.
_SESSIONS = itertools.count(1)

# Poll intervals of a wait, in seconds: short at first, then at most the maximum.
_FIRST_POLL_S = 0.005
_MAX_POLL_S = 0.5

# Exception types that keep their type when another rank raises them again,
# so that the command line reports configuration errors in one line there too.
_SHARED_ERROR_TYPES = {error_type.__name__: error_type
                       for error_type in (ValueError, FileNotFoundError, TimeoutError)}


def _read_int(environ, name, default):
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: invalid value {value!r}; expected an integer, as "
                         "python -m paddle.distributed.launch sets it.") from None


def _read_timeout(environ):
    value = environ.get(TIMEOUT_VARIABLE)
    if value is None or value == "":
        return DEFAULT_TIMEOUT_S
    try:
        timeout = float(value)
    except ValueError:
        timeout = float("nan")
    if not timeout > 0:
        raise ValueError(f"{TIMEOUT_VARIABLE}: invalid value {value!r}; expected the "
                         "seconds one process waits for another, a number > 0.")
    return timeout


def current_ranks(environ=None):
    """Return this process's ``Ranks``, read from the launcher's environment variables.

    Without ``PADDLE_TRAINERS_NUM`` (a plain ``python tools/infer.py``) the
    process is rank 0 of 1.

    Raises:
        ValueError: when a variable is not an integer, the rank is outside
            ``[0, world_size)``, or ``PADDLE_MASTER`` is missing with more
            than one process.
    """
    environ = os.environ if environ is None else environ
    world_size = _read_int(environ, WORLD_SIZE_VARIABLE, 1)
    rank = _read_int(environ, RANK_VARIABLE, 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{RANK_VARIABLE}={rank} and {WORLD_SIZE_VARIABLE}={world_size} "
                         "do not describe a process: the rank must be in [0, world size).")
    if world_size > 1 and not environ.get(MASTER_VARIABLE):
        raise ValueError(
            f"{WORLD_SIZE_VARIABLE}={world_size} but {MASTER_VARIABLE} is not set, so the "
            "processes cannot exchange results. Start them with python -m "
            "paddle.distributed.launch, which sets it, or set it to host:port of rank 0.")
    return Ranks(rank=rank, world_size=world_size, timeout_s=_read_timeout(environ),
                 session=next(_SESSIONS))


def assign_batches(batches, rank, world_size):
    """Return the batches of one rank: every ``world_size``-th, starting at ``rank``.

    Batches stay whole, so each keeps the images and the dropout seed it has
    in a run with one process. Dealing them out in turn keeps the shares
    within one batch of each other.

    Args:
        batches: the batches of the whole run, in order.
        rank: this process's rank, in ``[0, world_size)``.
        world_size: the number of processes.
    """
    return list(batches)[rank::world_size]


def check_same_images(ranks, entries, config_key):
    """Raise on every rank unless every rank lists the same images in the same order.

    Rank 0 compares the number of entries and a SHA-256 of them.

    Args:
        ranks: this process's ``Ranks``.
        entries: one string per image, its path (and label, for eval).
        config_key: the config key of the image list, named in the error.

    Raises:
        ValueError: on every rank, naming the first rank whose list differs
            from rank 0's.
    """
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(entry.encode("utf-8", "surrogateescape") + b"\n")
    listings = ranks.gather((len(entries), digest.hexdigest()), f"{config_key} listing")

    def compare():
        for rank, (count, checksum) in enumerate(listings):
            if count != listings[0][0]:
                problem = f"rank {rank} lists {count} images and rank 0 lists {listings[0][0]}"
            elif checksum != listings[0][1]:
                problem = (f"rank {rank} lists other images than rank 0, or the same "
                           f"{count} images in another order")
            else:
                continue
            raise ValueError(f"{config_key}: {problem}. Every process must see the same "
                             "images; on several nodes, the same files under the same paths.")

    ranks.run_on_main(compare if ranks.is_main else None, f"{config_key} listing check")


@dataclasses.dataclass
class _Failure:
    rank: int
    type_name: str
    message: str


@dataclasses.dataclass
class Ranks:
    """This process's place among the processes of a run, and the exchanges between them.

    With ``world_size`` 1 every exchange returns at once and no store is
    opened. Otherwise the first exchange connects to the launcher's store,
    which waits until every rank has connected.

    Attributes:
        rank: this process's rank; rank 0 merges and writes the results.
        world_size: the number of processes.
        timeout_s: how long an exchange waits for another rank, in seconds.
        session: the number of this run among the runs of the process, the
            same on every rank, which keeps the store keys of runs apart.
    """

    rank: int = 0
    world_size: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S
    session: int = 0
    _store: object = dataclasses.field(default=None, repr=False)
    _exchange_count: int = dataclasses.field(default=0, repr=False)

    @property
    def is_main(self):
        """Whether this is rank 0, the process that merges and writes the results."""
        return self.rank == 0

    @property
    def label(self):
        """``rank R of W``, for messages and progress bars."""
        return f"rank {self.rank} of {self.world_size}"

    # Exchanges.

    def gather(self, obj, name):
        """Send ``obj`` to rank 0.

        Returns:
            On rank 0, a list with each rank's object, in rank order. None on
            the other ranks.
        """
        if self.world_size == 1:
            return [obj]
        base = self._next_base(name)
        if not self.is_main:
            self._send(base, self.rank, 0, obj)
            return None
        others = range(1, self.world_size)
        self._wait_for_senders(base, others, 0, name)
        return [obj] + [self._receive(base, source, 0) for source in others]

    def scatter(self, objs, name):
        """Send ``objs[r]`` from rank 0 to rank r and return this rank's object.

        Args:
            objs: on rank 0, one object per rank; ignored on the others.
        """
        if self.world_size == 1:
            return objs[0]
        base = self._next_base(name)
        if self.is_main:
            if len(objs) != self.world_size:
                raise ValueError(f"scatter {name!r}: got {len(objs)} objects for "
                                 f"{self.world_size} ranks.")
            for target in range(1, self.world_size):
                self._send(base, 0, target, objs[target])
            return objs[0]
        self._wait_for_senders(base, [0], self.rank, name)
        return self._receive(base, 0, self.rank)

    def broadcast(self, obj, name):
        """Send ``obj`` from rank 0 to every rank and return it; ``obj`` is ignored elsewhere."""
        return self.scatter([obj] * self.world_size if self.is_main else None, name)

    def check(self, error, name):
        """Raise on every rank when ``error`` is set on any rank.

        Every rank calls it after a step that can fail on one rank only, for
        example opening that rank's own file, so that no rank goes on to wait
        for one that has stopped.

        Args:
            error: the exception this rank caught in the step, or None.
            name: the step, named in the message.

        Raises:
            The rank's own ``error`` when it has one. Otherwise, the error of
            the lowest failed rank, with its rank in the message, as the same
            type for ValueError, FileNotFoundError and TimeoutError and as
            RuntimeError for any other.
        """
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        own = None if error is None else _Failure(self.rank, type(error).__name__, str(error))
        failures = self.gather(own, f"{name}/errors")
        if self.is_main:
            failures = [failure for failure in failures if failure is not None]
        failures = self.broadcast(failures, f"{name}/verdict")
        if not failures:
            return
        # Rank 0 hosts the store, so it must not exit before every rank has the verdict.
        self.finish()
        if error is not None:
            raise error
        first = failures[0]
        error_type = _SHARED_ERROR_TYPES.get(first.type_name, RuntimeError)
        raise error_type(f"rank {first.rank} of {self.world_size} failed in step "
                         f"{name!r} with {first.type_name}: {first.message}")

    def run_on_all(self, function, name):
        """Run ``function`` on every rank and return this rank's result.

        Raises:
            What ``function`` raised on any rank, on every rank, as ``check``
            describes.
        """
        result = error = None
        try:
            result = function()
        except Exception as caught:  # noqa: BLE001 - re-raised on every rank by check
            error = caught
        self.check(error, name)
        return result

    def run_on_main(self, function, name):
        """Run ``function`` on rank 0 and return its result on every rank.

        Raises:
            What ``function`` raised, on every rank, as ``check`` describes.
        """
        result = error = None
        if self.is_main:
            try:
                result = function()
            except Exception as caught:  # noqa: BLE001 - re-raised on every rank by check
                error = caught
        self.check(error, name)
        return self.broadcast(result, f"{name}/result")

    def finish(self):
        """Keep rank 0, which hosts the store, running until every rank has done its last read.

        Call it on every rank after its last exchange. A rank that reads from
        the store after rank 0 has exited gets a connection error.
        """
        if self.world_size == 1:
            return
        key = self._next_base("finish")
        self._store_call("add", key, 1)
        if self.is_main:
            self._wait(lambda: self._store_call("add", key, 0) >= self.world_size,
                       lambda: f"{self.world_size - self._store_call('add', key, 0)} rank(s)",
                       "finish")

    # Store access.

    def _next_base(self, name):
        self._exchange_count += 1
        return f"{_KEY_PREFIX}/{self.session}/{self._exchange_count}/{name}"

    def _connect(self):
        if self._store is None:
            from paddle.base import core

            try:
                self._store = core.create_or_get_global_tcp_store()
            except (RuntimeError, ValueError) as error:
                raise RuntimeError(
                    f"{self.label}: cannot connect to the store at "
                    f"{os.environ.get(MASTER_VARIABLE)!r} ({MASTER_VARIABLE}): {error}") from None
        return self._store

    def _store_call(self, method, *args):
        store = self._connect()
        try:
            return getattr(store, method)(*args)
        except (RuntimeError, ValueError) as error:
            raise RuntimeError(
                f"{self.label}: the store at {os.environ.get(MASTER_VARIABLE)!r}, which rank 0 "
                f"hosts, failed ({' '.join(str(error).split())[:300]}). Rank 0 has probably "
                "stopped; see its output, or workerlog.0 in the launcher's --log_dir "
                "(./log by default).") from None

    def _send(self, base, source, target, obj):
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        chunks = [data[start:start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES)]
        channel = f"{base}/{source}-{target}"
        for index, chunk in enumerate(chunks):
            self._store_call("set", f"{channel}/{index}", chunk)
        # The count is written last, so a reader that sees it finds every chunk.
        self._store_call("add", f"{channel}/count", len(chunks) + 1)

    def _receive(self, base, source, target):
        channel = f"{base}/{source}-{target}"
        count = self._store_call("add", f"{channel}/count", 0) - 1
        parts = []
        for index in range(count):
            key = f"{channel}/{index}"
            parts.append(self._store_call("get", key))
            self._store_call("set", key, b"")
        return pickle.loads(b"".join(parts))

    def _wait_for_senders(self, base, sources, target, name):
        def missing():
            return [source for source in sources
                    if self._store_call("add", f"{base}/{source}-{target}/count", 0) == 0]

        def describe():
            return "rank(s) " + ", ".join(str(source) for source in missing())

        self._wait(lambda: not missing(), describe, name)

    def _wait(self, ready, describe_missing, name):
        started = time.monotonic()
        interval = _FIRST_POLL_S
        while not ready():
            if time.monotonic() - started > self.timeout_s:
                raise TimeoutError(
                    f"{self.label} waited {self.timeout_s:g} s in step {name!r} for "
                    f"{describe_missing()}, which did not get there. See their output "
                    "(workerlog.<rank> in the launcher's --log_dir, ./log by default); "
                    f"to wait longer, set {TIMEOUT_VARIABLE} to the seconds to wait.")
            time.sleep(interval)
            interval = min(interval * 2, _MAX_POLL_S)

"""A training run: its directory, checkpoints and resume, signals, device, precision and seeds.

A run directory holds::

    <out>/config.toml           the fully resolved config, rewritten at every (re)start
    <out>/run.log               the log lines the console shows
    <out>/tb/                   TensorBoard events (snexp.runtime.track.Tracker)
    <out>/checkpoints/last.pt   everything needed to continue as if never stopped
    <out>/checkpoints/best.pt   the same, at the best metric (where an experiment has one)
    <out>/.snexp-run            the stamp: only a folder with it is a run --overwrite may replace
    <out>/.snexp-lock           flock'ed by the process running in <out> (a second one is refused)

A checkpoint is one dict of plain containers and tensors (format version, config, counters,
model/optimizer/scheduler/scaler state dicts, experiment state, RNG states of python, numpy and
torch CPU/CUDA, the data-order generator), written atomically (temporary file, fsync,
``os.replace``) and read with ``torch.load(weights_only=True)``: a SIGKILL at any moment leaves
the previous checkpoint intact, and loading never executes code.

The loop stays in charge; :class:`Run` gives it a few calls::

    with Run(cfg, experiment="stylize", safe_keys=("train.epochs",)) as run:
        net = run.prepare(model)                    # device, channels-last, torch.compile
        run.attach(model=model, optimizer=opt)      # what checkpoints hold; loads on --resume
        loader = run.dataloader(dataset, batch_size=4)
        for epoch in run.epochs(cfg.train.epochs):  # checkpoint at every epoch end
            for x in run.batches(loader):           # mid-epoch resume skips used batches
                with run.autocast():
                    loss = criterion(net(run.to_device(x)))
                run.optimizer_step(loss, opt)
                run.step_done(loss, {"loss/total": loss})  # count, log, checkpoint, stop

With ``--deterministic`` on CPU, a run stopped at any step and resumed ends with the same
weights and metrics as one never stopped (tests/snexp/runtime/test_run.py).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs data-parallel
(snexp.runtime.distributed):
each rank uses ``cuda:LOCAL_RANK`` (or the CPU), ``prepare`` wraps the model in
DistributedDataParallel, ``dataloader`` gives each rank its shard, and only rank 0 writes the
run directory, logs and TensorBoard. Checkpoints, stops and ``update_best`` are collective: all
ranks call them at the same points, as the loop above does
(tests/snexp/runtime/test_distributed.py).

The package: :class:`Run` (:mod:`~snexp.runtime.run.core`) holds its members, one job each,
and gives the loop their calls:

- :mod:`~snexp.runtime.run.session`: starting and ending the run (directory, ``run.log``,
  seeds, ``config.toml``, tracker, signals; the final checkpoint; putting the process back);
- :mod:`~snexp.runtime.run.state`: :class:`RunState`, the counters a checkpoint restores;
- :mod:`~snexp.runtime.run.data`: the data order (seeded DataLoaders, shards, mid-epoch resume);
- :mod:`~snexp.runtime.run.checkpointer`: what a checkpoint holds, writing and restoring it;
- :mod:`~snexp.runtime.run.stops`: SIGINT/SIGTERM, agreed stops, and the exceptions that end a
  run;
- :mod:`~snexp.runtime.run.loop`: epochs, batches, step accounting, best metric, stops;
- :mod:`snexp.runtime.device`: the device and ``--amp`` (autocast, GradScaler, bf16 support);

and before the run starts, :mod:`~snexp.runtime.run.directory` (the checks of
``--out``/``--resume``/``--overwrite``, new run directory names), :mod:`~snexp.runtime.run.resume`
(the config keys that may change on resume), :mod:`~snexp.runtime.run.claim` (the lock and a
reversible ``--overwrite``) and :mod:`~snexp.runtime.run.log` (``run.log``).
"""

from snexp.runtime.checkpoint import load_checkpoint, save_checkpoint, seed_everything
from snexp.runtime.device import select_device
from snexp.runtime.run.core import Run
from snexp.runtime.run.resume import RUNTIME_SAFE_KEYS
from snexp.runtime.run.state import RunState
from snexp.runtime.run.stops import NonFiniteLoss, RunInterrupted, RunStopped

# The checkpoint, device and seeding helpers are re-exported: callers import them from here.
__all__ = ["RUNTIME_SAFE_KEYS", "NonFiniteLoss", "Run", "RunInterrupted", "RunState",
           "RunStopped", "load_checkpoint", "save_checkpoint", "seed_everything",
           "select_device"]

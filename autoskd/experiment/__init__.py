"""One experiment = one file: ``autoskd run experiment.yaml``.

An experiment file names everything a run depends on::

    kind: distill                 # distill | stages | search | tune | chain
    team: teams/minilm-ladder.yaml   # or the team's mapping inline
    task: {name: rotten_tomatoes, max_train: 200, max_eval: 200}   # or lm:<corpus>
    seed: 0
    out: runs/x
    distill: {method: kd, options: {temperature: 2}, epochs: 3, lr: 1.0e-4, batch_size: 32}

and one section for its kind: ``distill`` (a method), ``stages`` (a stage plan), ``search``
(AutoSKD: ``preset`` plus overrides, ``theta:`` settings), ``tune`` (``space`` plus sampler,
trials, ASHA, storage) or ``chain`` (teacher assistants); ``scale`` (DeepSpeed, tensor
parallelism) for distill, stages and search. A language-model task (``task: lm:<corpus>``,
a team with ``kind: lm``) runs as ``kind: distill`` with the decoder keys ``precision``,
``top_k``, ``layout`` and ``max_steps``.

Every command (``distill``, ``search``, ``tune``, ``chain``) writes such an experiment from its
flags; ``--set key=value`` edits any key on any of them. The run writes the resolved file
(team inline, every default filled in) as ``<out>/experiment.yaml``, and
``autoskd run <out>/experiment.yaml --out <new>`` runs it again. Paths in the file are read
from the working directory, as on the command line.

Layers: :mod:`.schema` (checks, did-you-mean), :mod:`.sections` (the keys of each section),
:mod:`.teams`, :mod:`.overrides` (``--set``), :mod:`.resolve` (file -> complete experiment),
:mod:`.files` (read, write, fingerprint), :mod:`.preview` (``--dry-run``), :mod:`.runner` (run
it), :mod:`.command` (a command's flags -> an experiment).
"""

from .files import dump_experiment, experiment_fingerprint, load_experiment, write_experiment
from .overrides import apply_overrides, apply_sets
from .resolve import resolve_experiment
from .runner import run_experiment

__all__ = ["resolve_experiment", "run_experiment", "experiment_fingerprint", "load_experiment", "write_experiment",
           "dump_experiment", "apply_sets", "apply_overrides"]

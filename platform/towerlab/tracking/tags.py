"""The MLflow tag vocabulary towerlab writes and searches by, in one place: a tag's name is written once here and
imported wherever a run is tagged or looked up (sweeps find their parent run, reproduce compares commits, the
CLI shows failures)."""

FAILURE = "towerlab.failure"  # the root cause of a failed run, set where it is known (worker or driver)
GIT_COMMIT = "towerlab.git_commit"  # the code's commit, "-dirty" when tracked files had changes
DATA_FINGERPRINT = "towerlab.data_fingerprint"  # the prepared dataset's fingerprint (manifest)
DATA_SOURCE = "towerlab.data_source"
DATA_SKIPPED_SHARDS = "towerlab.data_skipped_shards"  # shards skipped under data.bad_shards=skip
RUN_NAME = "towerlab.run_name"  # the recipe's name (the run directory under train.storage_path)
BATCH_PLAN = "towerlab.batch_plan"  # global batch = micro-batch x accumulation x workers
VERSION_PREFIX = "towerlab.version."  # + package name: the versions the run used
REPRODUCES = "towerlab.reproduces"  # on a `towerlab reproduce` run: the run id it reruns
SWEEP = "towerlab.sweep"  # the sweep's name, on its parent and on every trial
ROLE = "towerlab.role"  # "sweep" (the parent run) or "trial" (a child)
TRIAL_ID = "towerlab.trial_id"  # Ray Tune's trial id, on a trial's child run
HEARTBEAT = "towerlab.heartbeat"  # Unix time (s) of the driver's latest sign of life while the run is RUNNING
MODELS_NOTE = "towerlab.models_note"  # what the run's logged models lack (e.g. a tokenizer outside towerlab)
PREVIOUS_FAILURE = "towerlab.previous_failure"  # on a resumed run: the failure of the launch before
CONFIG = "towerlab.config"  # a trial's configuration without its seed (the sweep's replicates share it)
SEED = "towerlab.seed"  # a trial's recipe seed (one replicate of its configuration)

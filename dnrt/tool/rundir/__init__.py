"""The run folder, the one place that writes and reads it. A module per file of the folder:

- `files`: the file names and the atomic writer every file goes through (umask's mode), strict JSON, --out paths;
- `lock`: dnrt.lock, one owner per folder (fcntl.flock);
- `manifest`: manifest.json, what dnrt wrote (what --overwrite may remove);
- `config_json`: config.json and which keys make another run;
- `log`: log.txt, read, checked, kept and appended;
- `checkpoint`: the checkpoints' content, save, weights_only load, fit and finiteness checks;
- `folder`: taking a folder and deciding what a run started there does (continue, report, refuse, replace).

The names below are the ones the rest of the tool uses."""
from dnrt.tool.rundir.checkpoint import (checkpoint_in, checkpoint_state, load_checkpoint, load_run, load_weights,
                                         non_finite_tensors, save_checkpoint, unreadable)
from dnrt.tool.rundir.config_json import (COMMAND_KEYS, NEUTRAL_KEYS, changed_keys, describe, is_dnrt_config,
                                          read_config, result_changes, write_config)
from dnrt.tool.rundir.files import (BEST, CONFIG, EVAL, JOB, LATEST, LOCK, LOG, MANIFEST, TENSORBOARD, atomic_write,
                                    dumps,
                                    is_folder_target, numbered, output_error, output_path, read_json,
                                    remove_temp_files, temp_beside, usable_folder, write_eval, write_json, write_text)
from dnrt.tool.rundir.folder import Plan, best_and_last, owned, plan_run
from dnrt.tool.rundir.lock import RunLock
from dnrt.tool.rundir.log import append_log, check_log, first_epoch, log_lines, read_log, start_log
from dnrt.tool.rundir.manifest import record, remove_run, split_files

__all__ = ["BEST", "COMMAND_KEYS", "CONFIG", "EVAL", "JOB", "LATEST", "LOCK", "LOG", "MANIFEST", "NEUTRAL_KEYS", "Plan",
           "RunLock", "TENSORBOARD", "append_log", "atomic_write", "best_and_last", "changed_keys", "check_log",
           "checkpoint_in", "checkpoint_state", "describe", "dumps", "first_epoch", "is_dnrt_config", "is_folder_target",
           "load_checkpoint", "load_run", "load_weights", "log_lines", "non_finite_tensors", "numbered",
           "output_error", "output_path", "owned", "plan_run", "read_config", "read_json", "read_log", "record",
           "remove_run", "remove_temp_files", "result_changes", "save_checkpoint", "split_files", "start_log",
           "temp_beside", "unreadable", "usable_folder", "write_config", "write_eval", "write_json", "write_text"]

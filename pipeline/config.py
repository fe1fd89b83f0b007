"""The Hydra side of the config: the schema (pipeline.schema) registered in Hydra's ConfigStore, the
resolvers conf/ uses, and where conf/ is.

conf/ holds the config groups (model/ prompts/ patching/ resources/ tracking/ experiment/), each only what
differs from the schema; their YAML is merged onto `PatchsweepConfig`, so a misspelt key or a wrong type
fails at compose time. `pipeline.validation` then checks what types cannot, before any compute, and
returns the typed config.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.schema import PatchsweepConfig

# ${stem:path,default} labels a prompt file by its stem; ${basename:path,default} a model by its folder name.
OmegaConf.register_new_resolver("stem", lambda path, default: Path(str(path)).stem if path else default, replace=True)
OmegaConf.register_new_resolver("basename", lambda path, default: Path(str(path)).name if path else default,
                                replace=True)


def job_overrides() -> str:
    """In a --multirun job, "/" and the values the multirun sweeps over, as this job has them, e.g.
    "/model.path-llama,patching.metric-kl-3f2a1c" (a path by its last part; the hash of the exact values keeps
    jobs apart whose readable parts agree). The same command gives the same folders, so it resumes. No "=":
    DuckDB, pyarrow and polars would read a key=value folder as a Hive partition, a column that overwrites
    the table's own (`model`). "" in a single run and outside Hydra's command line."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    parser = OverridesParser.create()
    swept = {o.key_or_group for o in parser.parse_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
             if o.is_sweep_override()}
    values = [(o.key_or_group, o.get_value_element_as_str())
              for o in parser.parse_overrides(list(HydraConfig.get().overrides.task)) if o.key_or_group in swept]
    if not values:
        return ""
    readable = ",".join(f"{key}-{_folder_safe(Path(value).name or value)}" for key, value in sorted(values))
    exact = hashlib.sha256(json.dumps(sorted(values)).encode()).hexdigest()[:6]
    return f"/{readable}-{exact}"


def _folder_safe(text: str) -> str:
    return re.sub(r"[^\w.+-]", "_", text)[:60]


OmegaConf.register_new_resolver("job_overrides", job_overrides, replace=True)
ConfigStore.instance().store(name="patchsweep_schema", node=PatchsweepConfig)


def _conf_dir() -> Path:
    """The config groups: inside the package where a wheel put them (pyproject.toml maps the repository's
    conf/ to pipeline/conf), else conf/ at the top of the checkout this module runs from. Found by file
    path, not through the import system: a checkout run with PYTHONPATH beside an editable install of
    another checkout must read its own conf/."""
    package = Path(__file__).resolve().parent
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parent / "conf"


CONF_DIR = _conf_dir()


def to_dict(cfg: DictConfig | dict) -> dict:
    """A composed config as a plain, fully resolved dict (before it is typed by pipeline.validation)."""
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)

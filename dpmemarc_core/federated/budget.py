"""A site's privacy budget, kept by the site on its own disk: the one authority on what it has spent.

The server is not trusted with a site's budget. Nothing it sends is ever adopted as the site's history
(an earlier design took the longer of the site's and the server's copies; a forged copy then reset a
site at ε = 8 to ε = 0.035). The site writes its accountant after every round, atomically and before
its reply leaves, so a crash can only lose a round that released nothing; a restarted SuperNode reads
it back and goes on counting.

Which record a round is charged to is the site's *identity*:
- a site with its own data file (node config ``data-path``) has one record per file, across every run
  and every server: the file's privacy loss adds up whatever run it serves. A new budget means a new
  record, which only the site operator can make (another ``state-dir``, or removing the record).
- a simulated site (a ``partition-id`` share of a public data set, as in ``flwr run .``) has one record
  per run lineage: the server's random ``run-lineage`` token, kept in its output directory so that a
  resumed run continues the same records. Those shares are public data; the scheme is there so that
  simulations exercise the same code path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from dpmemarc_core.privacy import PrivacyAccountant

STATE_DIR_ENV = "DPMEMARC_STATE_DIR"
RUN_LINEAGE_KEY = "run-lineage"  # the train message's config entry naming the run lineage
DEFAULT_STATE_DIR = Path("~/.cache/dpmemarc/site-state")


def state_dir(node_config: Mapping[str, object]) -> Path:
    """The node config's ``state-dir``, else $DPMEMARC_STATE_DIR, else ~/.cache/dpmemarc/site-state."""
    value = node_config.get("state-dir") or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    if not isinstance(value, (str, Path)):
        raise ValueError(f"node config 'state-dir' must be a directory path, got {value!r}")
    return Path(value).expanduser().resolve()


def site_identity(node_config: Mapping[str, object], run_lineage: str) -> dict[str, object]:
    """What the site's record is keyed by (see the module docstring)."""
    data_path = node_config.get("data-path")
    if data_path:
        return {"data-path": str(Path(str(data_path)).expanduser().resolve())}
    return {"run-lineage": run_lineage, "partition-id": node_config.get("partition-id"),
            "num-partitions": node_config.get("num-partitions")}


class SiteBudgetRecord:
    """The accountant of one site identity, stored as ``<state-dir>/<hash of the identity>.json``."""

    def __init__(self, directory: Path, identity: Mapping[str, object]) -> None:
        self.identity = dict(identity)
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:32]
        self.path = Path(directory) / f"{digest}.json"

    def load(self, kind: str) -> PrivacyAccountant:
        """The recorded accountant, or a new one if this identity has never trained. A record that cannot be
        read is an error, never a fresh start: starting over would under-count."""
        if not self.path.exists():
            return PrivacyAccountant(kind)
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            accountant = PrivacyAccountant.from_state_dict(record["accountant"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"the site's privacy record {self.path} cannot be read ({error}); refusing to train "
                             f"rather than start the budget over") from None
        if accountant.kind != kind:
            raise ValueError(f"the site's privacy record {self.path} uses the {accountant.kind!r} accountant, the "
                             f"run asks for {kind!r}; a run may not change how the site's budget is counted")
        return accountant

    def save(self, accountant: PrivacyAccountant) -> None:
        """Write atomically and durably (temp file, fsync, rename, fsync of the directory)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"identity": self.identity, "accountant": accountant.state_dict()}, indent=1) + "\n"
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

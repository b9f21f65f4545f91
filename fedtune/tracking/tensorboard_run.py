"""``tracking=tensorboard``: the run as TensorBoard event files in ``RUN_DIR/tensorboard``.

Written with torch's :class:`~torch.utils.tensorboard.SummaryWriter` (the writer Hugging
Face's ``TensorBoardCallback`` uses), read by ``tensorboard --logdir outputs/`` (every
run directory below is a run; a sweep's jobs sit under its directory).  Scalars are
flushed after every round, so a killed run's events survive up to its checkpoint.

Resume after round c's checkpoint: the new writer opens with ``purge_step=c``, a
``SessionLog.START`` event at step c, on which TensorBoard's readers drop every earlier
event at step >= c (their restart handling); round c is then logged again from
``metrics.csv``.  So no step appears twice and none is lost, whether the killed process
had logged round c or not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.tracking.base import Tracker, flat_config, run_plots, write_state

LOG_DIR = "tensorboard"


class TensorBoardRun(Tracker):
    """One event directory per run (module doc)."""

    def __init__(self, cfg: Any, run_dir: Path, sweep: Path | None, resumed_round: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / LOG_DIR
        self.resumed = resumed_round is not None and any(self.log_dir.glob("events.out.tfevents.*"))
        self.next_round = resumed_round if self.resumed else 0
        self.last_round = 0
        self.writer = SummaryWriter(str(self.log_dir), purge_step=resumed_round if self.resumed else None)
        write_state(run_dir, {"backend": "tensorboard", "log_dir": str(self.log_dir),
                              "sweep": str(sweep) if sweep else None})

    def log_config(self, config: dict[str, Any]) -> None:
        if self.resumed:  # the first process logged it at step 0, which the purge keeps
            return
        from omegaconf import OmegaConf
        from torch.utils.tensorboard.summary import hparams

        text = OmegaConf.to_yaml(OmegaConf.create(config))
        self.writer.add_text("config", "```yaml\n" + text + "```", 0)  # the text plugin renders markdown
        for summary in hparams(flat_config(config), {}):  # the HParams plugin's experiment + session start
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def write_metrics(self, server_round: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, server_round)
        self.writer.flush()
        self.last_round = server_round

    def log_artifacts(self, run_dir: Path) -> None:
        import numpy as np
        from PIL import Image

        for png in run_plots(run_dir):
            with Image.open(png) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"plots/{png.stem}", pixels, self.last_round, dataformats="HWC")
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.add_text("status", status, self.last_round)
        self.writer.close()

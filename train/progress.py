"""What a training run shows while it runs.

On a terminal, a tqdm bar carrying loss, tokens/s, MFU and the learning rate. Where stdout is
not a terminal (a pod's or SLURM's log file), one plain line per logged step instead, which
greps and tails well:

  step 100/1000 | loss 3.214 | val_loss 3.301 | tok/s 1.23e+04 | mfu 31.2% | lr 3.0e-04
"""

import sys

from tqdm import tqdm

# (metric, label, format) in the order shown.
SHOWN = (("loss", "loss", "{:.4g}"), ("val_loss", "val_loss", "{:.4g}"),
         ("score", "score", "{:.4g}"), ("val_score", "val_score", "{:.4g}"),
         ("tokens_per_s", "tok/s", "{:.3g}"), ("mfu", "mfu", "{:.1%}"),
         ("lr", "lr", "{:.2e}"), ("skipped_steps", "skipped", "{:.0f}"))


class Progress:
  def __init__(self, total: int, initial: int, *, active: bool, terminal: bool | None = None):
    self.total, self.active = total, active
    terminal = sys.stdout.isatty() if terminal is None else terminal
    self.bar = (tqdm(total=total, initial=initial, dynamic_ncols=True, mininterval=1.0)
                if active and terminal else None)

  def update(self, n: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def log(self, step: int, metrics: dict) -> None:
    shown = {label: fmt.format(metrics[k]) for k, label, fmt in SHOWN if k in metrics}
    if self.bar is not None:
      self.bar.set_postfix(shown, refresh=False)
    elif self.active:
      print(" | ".join([f"step {step}/{self.total}"] + [f"{k} {v}" for k, v in shown.items()]),
            flush=True)

  def message(self, text: str) -> None:
    """A line that does not break the bar."""
    if self.bar is not None:
      self.bar.write(text)
    elif self.active:
      print(text, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()

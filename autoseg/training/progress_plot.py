"""``progress.png``: losses, pseudo-Dice (with its moving average) beside the real Dice of the validation
cases predicted in full, learning rate, epoch time."""

from __future__ import annotations

from pathlib import Path

from autoseg.core.files import atomic_write_bytes


def plot_progress(epochs: list[dict], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [e["epoch"] for e in epochs]
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(x, [e["train_loss"] for e in epochs], label="train loss")
    axes[0].plot(x, [e["val_loss"] for e in epochs], label="val loss")
    twin = axes[0].twinx()
    twin.plot(x, [e["pseudo_dice_mean"] for e in epochs], "g:", label="pseudo Dice")
    twin.plot(x, [e["pseudo_dice_ema"] for e in epochs], "g-", label="pseudo Dice (EMA)")
    validated = [e for e in epochs if "real_dice_mean" in e]
    if validated:
        twin.plot(
            [e["epoch"] for e in validated],
            [e["real_dice_mean"] for e in validated],
            "mo-",
            label="real Dice (full cases)",
        )
    twin.set_ylim(0, 1)
    axes[0].legend(loc="upper left")
    twin.legend(loc="upper right")
    axes[1].plot(x, [e["lr"] for e in epochs])
    axes[1].set_ylabel("learning rate")
    axes[2].plot(x, [e["epoch_time_s"] for e in epochs])
    axes[2].set_ylabel("epoch time (s)")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())

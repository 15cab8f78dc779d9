"""Training curves as PNG (matplotlib, no display)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from training.artifacts import atomic_write  # noqa: E402


def plot_history(history: list[dict], title: str, path) -> None:
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o--", alpha=0.6, label="train, running (dropout, label smoothing)")
    ax_loss.plot(epochs, [r["train_eval_loss"] for r in history], "o-", label="train (eval mode)")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [r["train_eval_accuracy"] for r in history], "o-", label="train (eval mode)")
    ax_acc.plot(epochs, [r["val_accuracy"] for r in history], "o-", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)

"""Track a model of one's own, trained by torch.optim.AdamW in one's own loop.

    python scripts/own_loop_example.py results/mine/run1 [steps]
    python cache.py --save-dir results --experiment mine --expid run1
    python plot.py --save-dir results --experiment mine --expid run1

The model is not in Models/; the loop is plain torch; only `track` is added.
"""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # not needed after pip install
from Utils.api import LiveFeedback, detect_groups, track  # noqa: E402

run_dir = sys.argv[1] if len(sys.argv) > 1 else "results/mine/run1"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
torch.manual_seed(0)
x_all = torch.randn(1024, 20)  # a synthetic 4-class problem
y_all = (x_all[:, :4] + 0.3 * torch.randn(1024, 4)).argmax(1)

model = nn.Sequential(  # Linear-BN-ReLU (scale), Linear-ReLU-Linear (rescale), classifier
    nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
groups = detect_groups(model, x_all[:64], y_all[:64])
tracker = track(model, optimizer, groups, run_dir=run_dir, every=1, steps_per_epoch=16)
live = LiveFeedback(tracker, steps, lines=True, tensorboard_dir=f"{run_dir}/tensorboard")
for step in range(steps):
    batch = torch.randint(0, 1024, (64,))
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x_all[batch]), y_all[batch])
    loss.backward()
    optimizer.step()
    if (step + 1) % 50 == 0:
        with torch.no_grad():
            model.eval()
            out = model(x_all)
            model.train()
        accuracy = (out.argmax(1) == y_all).double().mean().item()
        test_loss = nn.functional.cross_entropy(out, y_all).item()
        metrics = {"train_loss": loss.item(), "test_loss": test_loss, "top1": accuracy}
        tracker.log(metrics)  # into online.h5 and metrics.json
        live.evaluation(metrics)  # a line, and TensorBoard scalars
live.close()
tracker.close()
print(f"tracked {len(groups)} groups into {run_dir}; now run cache.py and plot.py on it")

"""RAA + ARR under Hugging Face Accelerate: the model is converted and ARR attached before `prepare`, and
`register_for_checkpointing(arr)` puts ARR's memory into `save_state`, so `load_state` resumes it.

    python examples/accelerate_arr.py --output-dir runs/accelerate
"""
import argparse

import torch
from accelerate import Accelerator
from torch import nn

import dnrt


def build() -> tuple[nn.Module, dnrt.ARR]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    dnrt.convert(model, torch.randn(2, 16))
    return model, dnrt.ARR(model, num_classes=4, layers=["1", "3"], weight=1.0)


parser = argparse.ArgumentParser()
parser.add_argument("--output-dir", default="runs/accelerate")
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()

accelerator = Accelerator(cpu=True)
model, arr = build()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
model, optimizer = accelerator.prepare(model, optimizer)
accelerator.register_for_checkpointing(arr)  # ARR's memory is saved and loaded with the run's state
x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
for step in range(args.steps):
    loss = nn.functional.cross_entropy(model(x), y) + arr.loss(y)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
accelerator.save_state(args.output_dir)
print(f"after {args.steps} steps: loss {loss.item():.3f}, classes seen {int((arr.memory.count > 0).sum())}")

fresh, fresh_arr = build()  # a new process would start here
fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
resumed = Accelerator(cpu=True)
fresh, fresh_optimizer = resumed.prepare(fresh, fresh_optimizer)
resumed.register_for_checkpointing(fresh_arr)
resumed.load_state(args.output_dir)
same = all(torch.equal(a, b) for a, b in zip(arr.state_dict().values(), fresh_arr.state_dict().values()))
print(f"ARR memory restored by load_state: {same}")

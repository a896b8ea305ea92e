"""What the recipes the tests write share: the classifier's steps, with the hooks a test adds before them.

A test recipe is its config and setup, then :func:`classifier_steps`: one copy of the steps, so that a
change to how a recipe trains is made once for every test that writes one.

Example:
    >>> steps = classifier_steps(asks=", state", before="    if state.iteration == 3:\\n        raise ef.EndEpoch\\n")
    >>> steps.splitlines()[2:4]
    ['def train(batch, model, optimizer, state):', '    if state.iteration == 3:']
"""

from __future__ import annotations

IMPORTS = '''
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import engineflow as ef
'''


def classifier_steps(*, asks: str = "", before: str = "") -> str:
    """A recipe's train step (cross-entropy on ``(x, y)`` batches, one optimizer step) and eval step
    (accuracy).

    Args:
        asks: more names the train step asks for, e.g. ``", state, run"``.
        before: lines the train step runs first, indented by four spaces, each ending with a newline.
    """
    return f'''
@ef.train_step
def train(batch, model, optimizer{asks}):
{before}    x, y = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {{"loss": loss}}

@ef.eval_step(metrics={{"accuracy": ef.metrics.Accuracy()}})
def evaluate(batch, model):
    x, y = batch
    return {{"y_pred": model(x), "y": y}}
'''


def accumulating_step(k: int) -> str:
    """A recipe's train step that adds up the gradients of ``k`` batches per optimizer step (``backprop``)."""
    return f'''
@ef.train_step(accumulate={k})
def train(batch, model, optimizer, backprop):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    backprop(loss, optimizer)
    return {{"loss": loss}}
'''

"""torch.compile(fullgraph=True) traces the model without graph breaks (the trainer's --compile path)."""

import torch

import memzoo
from memzoo.testing import assert_close


def test_language_model_compiles_fullgraph():
    torch._dynamo.reset()
    model = memzoo.build_model("attention-tiny")
    ids = torch.randint(0, 256, (2, 16))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    out = compiled(ids, labels=ids)
    ref = model(ids, labels=ids)
    assert_close(out.logits, ref.logits, 1e-4, "compiled logits")
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    more = compiled(ids[:, :4], state=out.state)
    assert_close(more.logits, model(ids[:, :4], state=ref.state).logits, 1e-4, "compiled continuation")

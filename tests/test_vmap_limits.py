"""What ``torch.func.vmap`` cannot batch, said in our words: the default method falls back to
``vmap`` for some calls (a mean loss, ``has_aux``), so its failures reach users who never
asked for it. Each message names the cause and a way that runs; the way is checked too."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functorch_pipeline as fp

F64 = torch.float64


def _encoder(nested: bool):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).to(F64).eval()
    head = nn.Linear(8, 3).to(F64)
    params = {f"enc.{k}": v.detach() for k, v in enc.named_parameters()}
    params.update({f"head.{k}": v.detach() for k, v in head.named_parameters()})

    def losses(p, x, kpm, y):
        enc_p = {k[4:]: v for k, v in p.items() if k.startswith("enc.")}
        head_p = {k[5:]: v for k, v in p.items() if k.startswith("head.")}
        h = torch.func.functional_call(enc, enc_p, (x,), {"src_key_padding_mask": kpm})
        return F.cross_entropy(torch.func.functional_call(head, head_p, (h.mean(1),)), y,
                               reduction="none")

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 8, generator=g, dtype=F64)
    kpm = torch.zeros(4, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    return losses, params, (x, kpm, torch.randint(0, 3, (4,), generator=g))


def test_transformer_encoder_nested_tensor_under_vmap():
    losses, params, batch = _encoder(nested=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"nested tensor that nn.TransformerEncoder builds "
                                               r"from src_key_padding_mask.*enable_nested_tensor=False"):
            fp.per_sample_grads(lambda p, *b: losses(p, *b).mean())(params, *batch)
        fast = fp.per_sample_grads(losses, method="hooks")(params, *batch)
    # the way out the message names: the same model without the nested tensor, under vmap
    losses2, params2, batch2 = _encoder(nested=False)
    via_vmap = fp.per_sample_grads(losses2, method="vmap")(params2, *batch2)
    for k in fast:
        torch.testing.assert_close(via_vmap[k], fast[k], rtol=0, atol=1e-10)


def test_running_statistics_under_vmap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, affine=True,
                                                                 track_running_stats=True)).to(F64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 2, 7, dtype=F64)

    def losses(p, x):
        return torch.func.functional_call(model, p, (x,)).pow(2).mean((1, 2))

    with pytest.raises(RuntimeError, match=r"cannot run a layer that updates state captured from "
                                           r"outside loss_fn in place.*method='hooks' runs InstanceNorm"):
        fp.per_sample_grads(losses, method="vmap")(params, x)
    got = fp.per_sample_grads(losses, method="hooks")(params, x)
    for i in range(4):  # a per-example loop (training mode: each example's own statistics)
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        want = torch.autograd.grad(losses(p, x[i:i + 1]).sum(), list(p.values()))
        for k, w in zip(p, want, strict=True):
            torch.testing.assert_close(got[k][i], w, rtol=0, atol=1e-10)

"""Which models of the public zoos the default per-sample method takes, and how close it is.

Not a timing benchmark: for each architecture of timm (image models, built at 64 x 64 with
BatchNorm replaced by GroupNorm, in train mode) and of Hugging Face ``transformers``
(language, vision and speech models from tiny configs; the speech models wav2vec 2.0 and
HuBERT with SpecAugment's time mask given as batch data), in float64 and at a batch of 3, it calls
``fp.per_sample_grad_norms`` and ``fp.clipped_grad`` with the default method and compares
both against a per-example autograd loop (the independent reference; ``vmap`` cannot run
many of these models: Hugging Face's masks use data-dependent control flow). A row says
``fast`` when no fall-back warning was raised and ``vmap`` with the reason when one was,
and the largest difference relative to the largest reference value (of the norms, and of
the clipped sum over all its leaves). A zoo that is not
installed is skipped with the command that installs it (``pip install
"functorch-pipeline[bench]"`` installs both).

    .venv/bin/python benchmarks/zoo_coverage.py                 # both zoos
    .venv/bin/python benchmarks/zoo_coverage.py --zoo hf --models gpt2,t5
    .venv/bin/python benchmarks/zoo_coverage.py --zoo hf --train   # training mode, dropout on
    .venv/bin/python benchmarks/zoo_coverage.py --zoo timm --train # dropout, stochastic depth
    .venv/bin/python benchmarks/zoo_coverage.py --zoo torchvision   # its image and video models
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402

import functorch_pipeline as fp  # noqa: E402

TIMM = (
    "resnet18,resnet26d,seresnet18,resnext26ts,efficientnet_b0,mobilenetv3_small_050,"
    "mobilenetv2_050,mnasnet_050,lcnet_050,regnetx_002,regnety_002,dla34,cspresnet50,"
    "vovnet39a,ese_vovnet19b_dw,hrnet_w18_small,dpn48b,skresnet18,resnest14d,densenet121,"
    "nf_resnet26,nfnet_l0,eca_nfnet_l0,nf_regnet_b0,resnetv2_50x1_bit,convnext_atto,"
    "convnextv2_atto,convmixer_768_32,vit_tiny_patch16_224,deit_tiny_patch16_224,"
    "deit3_small_patch16_224,vit_small_patch16_rope_224,beit_base_patch16_224,"
    "eva02_tiny_patch14_224,cait_xxs24_224,xcit_nano_12_p16_224,pvt_v2_b0,twins_pcpvt_small,"
    "levit_128s,mixer_s16_224,resmlp_12_224,gmlp_ti16_224,poolformer_s12,"
    "maxvit_nano_rw_256,coatnet_nano_rw_224,coat_lite_tiny,efficientformerv2_s0,"
    "mobilevit_xxs,mobilevitv2_050,edgenext_xx_small,fastvit_t8,repvit_m0_9,tiny_vit_5m_224,"
    "gcvit_xxtiny,davit_tiny,inception_next_tiny,hiera_tiny_224,mambaout_femto,hgnetv2_b0,"
    "starnet_s1,rdnet_tiny,mobilenetv4_conv_small"
).split(",")
HF = ("gpt2,bert,roberta,distilbert,albert,electra,deberta-v2,bart,llama,mistral,qwen2,gemma,"
      "phi3,gpt-neox,opt,t5,vit,wav2vec2,hubert").split(",")
VOCAB, LENGTH, BATCH = 97, 6, 3
TORCHVISION = {  # name -> input shape after the batch (the smallest each model takes)
    **dict.fromkeys(["resnet18", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
                     "mobilenet_v3_small", "efficientnet_b0", "efficientnet_v2_s",
                     "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5", "squeezenet1_1",
                     "densenet121", "googlenet", "mnasnet0_5", "alexnet", "vgg11",
                     "convnext_tiny", "swin_t", "swin_v2_t"], (3, 64, 64)),
    "inception_v3": (3, 299, 299), "maxvit_t": (3, 224, 224),
    **dict.fromkeys(["r3d_18", "mc3_18", "r2plus1d_18"], (3, 4, 32, 32)),
    "swin3d_t": (3, 8, 64, 64), "mvit_v1_b": (3, 16, 224, 224), "mvit_v2_s": (3, 16, 224, 224),
}
SAMPLES = 400  # audio samples per example: 38 frames after the tiny feature encoder


def loop_grads(losses: Callable[..., torch.Tensor], params: dict, batch: tuple) -> dict:
    """The reference: one ``torch.autograd.grad`` per example."""
    rows = []
    for i in range(batch[0].shape[0]):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        g = torch.autograd.grad(losses(p, *(b[i:i + 1] for b in batch)).sum(), list(p.values()),
                                allow_unused=True)
        rows.append([torch.zeros_like(v) if gi is None else gi for v, gi in zip(p.values(), g, strict=True)])
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(params)}


def row(name: str, losses: Callable[..., torch.Tensor], params: dict, batch: tuple) -> str:
    """One model: the default method's norms and clipped sum against the loop's."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        norms = fp.per_sample_grad_norms(losses)(params, *batch)
        clipped, _ = fp.clipped_grad(losses, 0.1)(params, *batch)
    said = [str(w.message) for w in caught if "method='auto'" in str(w.message)]
    per = loop_grads(losses, params, batch)
    want = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in per.values()).sqrt()
    factor = (0.1 / want).clamp(max=1.0)
    want_clipped = {k: (g * factor.reshape(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in per.items()}
    # Relative to the largest reference value of the whole sum, not leaf by leaf: some
    # leaves' true gradient is 0 (a key projection's bias under softmax), so theirs is
    # rounding noise over noise.
    scale = max(float(w.abs().max()) for w in want_clipped.values())
    diff = max(_common.max_relative_difference([norms], [want]),
               max(float((clipped[k] - want_clipped[k]).abs().max()) for k in per) / scale)
    method = "fast" if not any("falls back" in s or "uses 'vmap'" in s for s in said) else "vmap"
    size = sum(v.numel() for v in params.values()) / 1e6
    reason = f"  ({said[0][:160]})" if method == "vmap" else ""
    return (f"  {name:30s} {method:5s} max rel. diff {diff:.1e}  {size:6.2f}M params  "
            f"{time.perf_counter() - t0:4.1f} s{reason}")


def timm_rows(names: list[str], train: bool = False) -> None:
    """timm models at 64 x 64, BatchNorm -> GroupNorm, in train mode: with their dropout and
    stochastic depth at 0 (timm's default) against the loop (:func:`row`), or with
    ``train`` at dropout 0.1 and stochastic depth 0.2, where no loop sees the batch's
    masks: :func:`draws_row` says which method ran on each of 4 seeds."""
    timm = _common.optional("timm")
    if timm is None:
        print("  skipped timm: not installed (pip install timm)")
        return
    # a model without an img_size (or a drop_path_rate) argument takes the next
    rates = [{"drop_rate": 0.1, "drop_path_rate": 0.2}, {"drop_rate": 0.1}] if train else [{}]
    options = [{"img_size": 64, **r} for r in rates] + rates
    options.sort(key=lambda o: -len(o))
    for name in names:
        try:
            for i, kw in enumerate(options):
                torch.manual_seed(0)
                try:
                    model = timm.create_model(name, pretrained=False, num_classes=5, **kw)
                    break
                except TypeError:
                    if i == len(options) - 1:
                        raise
            model = fp.nn.replace_batchnorm_with_groupnorm(model, 1).double().train()
            params = {k: v.detach() for k, v in model.named_parameters()}
            x = torch.randn(BATCH, 3, 64, 64, dtype=torch.float64)
            y = torch.arange(BATCH) % 5

            def losses(p: dict, x: torch.Tensor, y: torch.Tensor, model: Any = model) -> torch.Tensor:
                return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

            print((draws_row if train else row)(name, losses, params, (x, y)), flush=True)
        except Exception as e:  # a model this harness cannot build at 64 x 64 and so on
            print(f"  {name:30s} not run: {type(e).__name__}: {str(e)[:120]}", flush=True)


def draws_row(name: str, losses: Callable[..., torch.Tensor], params: dict, batch: tuple) -> str:
    """One model that draws random numbers: the default method on 4 seeds, each call
    ``fast``, ``vmap`` (a fall-back) or the error it raised (``vmap`` refuses PyTorch's
    global RNG: NOTE [random draws in a padded run])."""
    t0 = time.perf_counter()
    seen = []
    for seed in range(4):
        torch.manual_seed(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                got = fp.per_sample_grads(losses)(params, *batch)
            except Exception as e:
                seen.append(f"{type(e).__name__}: {str(e)[:80]}")
                continue
        said = [str(w.message) for w in caught if "falls back" in str(w.message)]
        finite = all(bool(torch.isfinite(g).all()) for g in got.values())
        seen.append(("vmap" if said else "fast") + ("" if finite else " (not finite)"))
    summary = "fast on 4 seeds" if seen == ["fast"] * 4 else "; ".join(seen)
    return f"  {name:30s} {summary}  {time.perf_counter() - t0:4.1f} s"


def torchvision_rows(names: list[str]) -> None:
    """torchvision's classification and video models in eval mode (their dropout and
    stochastic depth off, so the loop sees the batch's function), BatchNorm -> GroupNorm,
    a batch of 2."""
    tv = _common.optional("torchvision")
    if tv is None:
        print("  skipped torchvision: not installed (pip install torchvision)")
        return
    for name in names:
        try:
            torch.manual_seed(0)
            extra = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
            model = tv.models.get_model(name, num_classes=5, **extra)
            model = fp.nn.replace_batchnorm_with_groupnorm(model, 1).double().eval()
            params = {k: v.detach() for k, v in model.named_parameters()}
            x = torch.randn(2, *TORCHVISION[name], dtype=torch.float64)
            y = torch.arange(2) % 5

            def losses(p: dict, x: torch.Tensor, y: torch.Tensor, model: Any = model) -> torch.Tensor:
                return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

            print(row(name, losses, params, (x, y)), flush=True)
        except Exception as e:
            print(f"  {name:30s} not run: {type(e).__name__}: {str(e)[:120]}", flush=True)


def _hf_models(T: Any) -> dict[str, tuple[str, Any, Any]]:
    small = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "intermediate_size": 64}
    causal = {**small, "num_key_value_heads": 1, "max_position_embeddings": 32}
    return {
        "gpt2": ("lm", T.GPT2LMHeadModel, lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2,
                                                              n_head=2, n_positions=16)),
        "bert": ("clf", T.BertForSequenceClassification, lambda: T.BertConfig(**small, num_labels=3)),
        "roberta": ("clf", T.RobertaForSequenceClassification,
                    lambda: T.RobertaConfig(**small, num_labels=3, max_position_embeddings=20)),
        "distilbert": ("clf", T.DistilBertForSequenceClassification, lambda: T.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3)),
        "albert": ("clf", T.AlbertForSequenceClassification, lambda: T.AlbertConfig(
            **small, embedding_size=16, num_labels=3)),
        "electra": ("clf", T.ElectraForSequenceClassification,
                    lambda: T.ElectraConfig(**small, embedding_size=16, num_labels=3)),
        "deberta-v2": ("clf", T.DebertaV2ForSequenceClassification,
                       lambda: T.DebertaV2Config(**small, num_labels=3)),
        "bart": ("clf", T.BartForSequenceClassification, lambda: T.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, num_labels=3, max_position_embeddings=20, eos_token_id=2,
            pad_token_id=1, bos_token_id=0)),
        "llama": ("lm", T.LlamaForCausalLM, lambda: T.LlamaConfig(**causal)),
        "mistral": ("lm", T.MistralForCausalLM, lambda: T.MistralConfig(**causal)),
        "qwen2": ("lm", T.Qwen2ForCausalLM, lambda: T.Qwen2Config(**causal)),
        "gemma": ("lm", T.GemmaForCausalLM, lambda: T.GemmaConfig(**causal, head_dim=16)),
        "phi3": ("lm", T.Phi3ForCausalLM, lambda: T.Phi3Config(**causal, pad_token_id=0)),
        "gpt-neox": ("lm", T.GPTNeoXForCausalLM, lambda: T.GPTNeoXConfig(**small, max_position_embeddings=32)),
        "opt": ("lm", T.OPTForCausalLM, lambda: T.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=32)),
        "t5": ("t5", T.T5ForConditionalGeneration, lambda: T.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
            decoder_start_token_id=0, pad_token_id=0)),
        "vit": ("image", T.ViTForImageClassification, lambda: T.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=16, patch_size=4, num_labels=3)),
        "wav2vec2": ("audio", T.Wav2Vec2ForSequenceClassification,
                     lambda: T.Wav2Vec2Config(**_AUDIO)),
        "hubert": ("audio", T.HubertForSequenceClassification, lambda: T.HubertConfig(**_AUDIO)),
    }


_AUDIO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64, "conv_dim": (8, 8), "conv_stride": (5, 2),
          "conv_kernel": (10, 3), "num_feat_extract_layers": 2, "num_conv_pos_embeddings": 4,
          "num_conv_pos_embedding_groups": 2, "num_labels": 3, "layerdrop": 0.0,
          "apply_spec_augment": True, "mask_time_prob": 0.3, "mask_time_length": 2}


def _hf_losses(kind: str, model: Any) -> Callable[..., torch.Tensor]:
    def losses(p: dict, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if kind == "image":
            return F.cross_entropy(torch.func.functional_call(model, p, (), {"pixel_values": ids}).logits,
                                   y, reduction="none")
        if kind == "audio":  # mask: SpecAugment's time mask, written with masked_spec_embed
            kw = {"input_values": ids, "mask_time_indices": mask}
            return F.cross_entropy(torch.func.functional_call(model, p, (), kw).logits, y,
                                   reduction="none")
        kw = {"input_ids": ids, "attention_mask": mask}
        if kind == "t5":
            kw["labels"] = ids[:, :3].contiguous()
        logits = torch.func.functional_call(model, p, (), kw).logits
        if kind == "clf":
            return F.cross_entropy(logits, y, reduction="none")
        if kind == "t5":
            target = ids[:, :3]
        else:  # next-token prediction
            logits, target = logits[:, :-1], ids[:, 1:]
        return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1),
                               reduction="none").reshape(ids.shape[0], -1).mean(1)

    return losses


def _hf_each(names: list[str], build: Callable[[Any, Any], Any],
             body: Callable[[str, str, Any, dict, tuple], None]) -> None:
    """For each named Hugging Face model: ``build(cls, config_factory)`` (seeded), tiny
    batch of ``BATCH`` examples of ``LENGTH`` tokens with padding in the first example
    (16 x 16 images for ViT), then ``body(name, kind, model, params, batch)``."""
    T = _common.optional("transformers")
    if T is None:
        print("  skipped transformers: not installed (pip install transformers)")
        return
    models = _hf_models(T)
    for name in names:
        try:
            kind, cls, config = models[name]
            torch.manual_seed(0)
            model = build(cls, config)
            params = {k: v.detach() for k, v in model.named_parameters()}
            ids = torch.randint(3, VOCAB, (BATCH, LENGTH))
            ids[:, -1] = 2  # an end-of-sequence token (BART's classifier reads it)
            mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
            mask[0, -3:-1] = 0  # padding in the first example
            if kind == "image":
                ids = torch.randn(BATCH, 3, 16, 16, dtype=torch.float64)
            if kind == "audio":
                ids = torch.randn(BATCH, SAMPLES, dtype=torch.float64)
                frames = int(model._get_feat_extract_output_lengths(torch.tensor(SAMPLES)))
                mask = torch.rand(BATCH, frames) < 0.3
            body(name, kind, model, params, (ids, mask, torch.arange(BATCH) % 3))
        except Exception as e:
            print(f"  {name:30s} not run: {type(e).__name__}: {str(e)[:120]}", flush=True)


def hf_rows(names: list[str]) -> None:
    def body(name: str, kind: str, model: Any, params: dict, batch: tuple) -> None:
        print(row(name, _hf_losses(kind, model), params, batch), flush=True)

    # eval: dropout off (no BatchNorm here)
    _hf_each(names, lambda cls, config: cls(config()).double().eval(), body)


_DROPOUT = ("dropout", "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "activation_dropout",
            "hidden_dropout", "dropout_rate", "classifier_dropout")
_ATTENTION_DROPOUT = ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")


@contextlib.contextmanager
def _value_masks() -> Iterator[None]:
    """``F.dropout`` keeping the elements above 0.05 (scaled by ``1 / (1 - p)``): masks
    decided by each element's own value, so a per-example loop sees the masks the batch
    saw, and the loop is a reference for a model in training mode."""
    original = F.dropout

    def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
        if not training or p == 0:
            return x
        return x * (x.detach() > 0.05).to(x.dtype) / (1 - p)

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


def hf_train_rows(names: list[str]) -> None:
    """Hugging Face models in training mode, dropout 0.1 on hidden states and activations
    (attention dropout off and eager attention: SDPA draws its own masks): norms and
    clipped sums against the loop with masks from the values (:func:`_value_masks`), then,
    with random masks, whether the per-example gradients' sum equals the batch gradient
    under the same seed and how many forwards the default method ran (a padded run is a
    second forward, and draws other masks than one batch forward)."""

    def build(cls: Any, config: Any) -> Any:
        cfg = config()
        for a in _DROPOUT:
            if isinstance(getattr(cfg, a, None), float):
                setattr(cfg, a, 0.1)
        for a in _ATTENTION_DROPOUT:
            if hasattr(cfg, a):
                setattr(cfg, a, 0.0)
        cfg._attn_implementation = "eager"
        return cls(cfg).double().train()

    def body(name: str, kind: str, model: Any, params: dict, batch: tuple) -> None:
        losses = _hf_losses(kind, model)
        with _value_masks():
            line = row(name, losses, params, batch)
        forwards: list[int] = []  # the batch size of each forward

        def seen(module: Any, args: Any, kwargs: dict) -> None:
            data = [kwargs.get(k) for k in ("input_ids", "pixel_values", "input_values")]
            forwards.append(next(d for d in data if d is not None).shape[0])

        hook = model.register_forward_pre_hook(seen, with_kwargs=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(7)
            got = fp.per_sample_grads(losses)(params, *batch)
        hook.remove()
        if forwards == [BATCH]:
            torch.manual_seed(7)
            want = fp.grad(lambda p: losses(p, *batch).sum())(params)
            total = max(float((got[k].sum(0) - want[k]).abs().max()) for k in want)
            print(f"{line}; random masks: one forward, sum vs batch gradient {total:.1e}",
                  flush=True)
        else:  # padded: its masks are drawn for more rows than one batch forward's
            print(f"{line}; random masks: forwards of {forwards} examples (padded: no "
                  "batch gradient draws the same masks)", flush=True)

    _hf_each(names, build, body)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--zoo", choices=["timm", "hf", "both", "torchvision"], default="both",
                   help="both: timm and Hugging Face")
    p.add_argument("--models", default=None, help="comma-separated names (default: the lists above)")
    p.add_argument("--train", action="store_true",
                   help="Hugging Face models in training mode with dropout on (hf_train_rows); "
                        "timm models with dropout and stochastic depth on (draws_row)")
    args = p.parse_args()
    if _common.begin(args):
        return
    torch.set_default_dtype(torch.float64)
    chosen = args.models.split(",") if args.models else None
    if args.zoo == "torchvision":
        print("torchvision (eval mode, BatchNorm -> GroupNorm, batch 2, float64):")
        torchvision_rows(chosen or list(TORCHVISION))
    if args.zoo in ("timm", "both"):
        rates = ", dropout 0.1, stochastic depth 0.2" if args.train else ""
        print(f"timm (train mode{rates}, BatchNorm -> GroupNorm, 64 x 64, batch 3, float64):")
        timm_rows(chosen or TIMM, args.train)
    if args.zoo in ("hf", "both") and args.train:
        print(f"transformers (tiny configs, training mode, dropout 0.1, {LENGTH} tokens with padding, "
              "batch 3, float64):")
        hf_train_rows(chosen or HF)
    elif args.zoo in ("hf", "both"):
        print(f"transformers (tiny configs, eval mode, {LENGTH} tokens with padding, batch 3, float64):")
        hf_rows(chosen or HF)


if __name__ == "__main__":
    main()

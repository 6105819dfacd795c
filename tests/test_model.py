"""RAHFModel: shapes, ranges, persistence, determinism, losses, padding invariance, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.names import HEATMAP_NAMES, SCORE_NAMES
from rahf.model import RAHFConfig, RAHFLabels, RAHFModel, pool_prompt, word_loss
from rahf.presets import build_rahf, preset_config

PROMPTS = ["a red cat on a blue mat", "two dogs", "an astronaut riding a horse, photo, 4k, detailed"]


def model_inputs(model, processor, images, prompts, heatmaps=HEATMAP_NAMES, scores=SCORE_NAMES, keywords=True):
    pixels = processor.preprocess_images(images)
    if model.config.variant == "multi_head":
        text = processor.tokenize(prompts)
    else:
        tasks = model.task_order(tuple(heatmaps), tuple(scores), keywords)
        text = processor.tokenize_tasks(prompts, [model.config.task_prefixes[t] for t in tasks])
    return pixels, text


def run(model, processor, images, prompts, channels_last=False, **kw):
    pixels, text = model_inputs(model, processor, images, prompts, **kw)
    with torch.no_grad():
        return model(pixels, text.input_ids, text.attention_mask, channels_last=channels_last, **kw)


def test_output_shapes_and_ranges(tiny, images):
    model, processor = tiny
    out = run(model, processor, images, PROMPTS)
    s = model.config.image_size
    assert set(out.heatmaps) == set(HEATMAP_NAMES) and set(out.scores) == set(SCORE_NAMES)
    for hm in out.heatmaps.values():
        assert hm.shape == (3, s, s) and hm.dtype == torch.float32
        assert float(hm.min()) >= 0.0 and float(hm.max()) <= 1.0
    for sc in out.scores.values():
        assert sc.shape == (3,) and float(sc.min()) > 0.0 and float(sc.max()) < 1.0
    assert out.text_states.shape[0] == 3 and out.text_states.shape[2] == model.config.text["d_model"]
    ids = model.generate_keyword_ids(out.text_states, out.text_mask, max_new_tokens=7)
    assert ids.shape[0] == 3 and ids.shape[1] <= 8
    assert int(ids.max()) < model.config.text["vocab_size"]


def test_subsets_skip_heads_and_match_full(tiny, images):
    model, processor = tiny
    full = run(model, processor, images, PROMPTS)
    part = run(model, processor, images, PROMPTS, heatmaps=("implausibility",), keywords=False)
    assert set(part.heatmaps) == {"implausibility"} and part.text_states is None
    torch.testing.assert_close(part.heatmaps["implausibility"], full.heatmaps["implausibility"], atol=1e-5, rtol=0)
    for n in SCORE_NAMES:
        torch.testing.assert_close(part.scores[n], full.scores[n], atol=1e-5, rtol=0)


def test_heads_differ_between_outputs(tiny, images):
    """Each heatmap / score is its own output (own head, or own task prefix), not one value copied."""
    model, processor = tiny
    out = run(model, processor, images, PROMPTS)
    assert not torch.allclose(out.heatmaps["implausibility"], out.heatmaps["misalignment"])
    assert not torch.allclose(out.scores["plausibility"], out.scores["alignment"])


def test_channels_last_heads_give_same_values(tiny, images):
    model, processor = tiny
    ref = run(model, processor, images, PROMPTS)
    model.heatmap_heads.to(memory_format=torch.channels_last)
    model.score_heads.to(memory_format=torch.channels_last)
    fast = run(model, processor, images, PROMPTS, channels_last=True)
    for n in HEATMAP_NAMES:
        torch.testing.assert_close(fast.heatmaps[n], ref.heatmaps[n], atol=1e-5, rtol=0)
    for n in SCORE_NAMES:
        torch.testing.assert_close(fast.scores[n], ref.scores[n], atol=1e-5, rtol=0)


def test_save_load_identical_outputs(tiny, images, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "processor_config.json"}
    loaded = RAHFModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    a = run(model, processor, images, PROMPTS)
    b = run(loaded, processor, images, PROMPTS)
    for n in HEATMAP_NAMES:
        assert torch.equal(a.heatmaps[n], b.heatmaps[n])
    for n in SCORE_NAMES:
        assert torch.equal(a.scores[n], b.scores[n])
    # Tied T5 embeddings stay tied after loading.
    assert loaded.text.lm_head.weight.data_ptr() == loaded.text.shared.weight.data_ptr()


def test_load_rejects_mismatched_weights(tiny_multi, tmp_path):
    model, _ = tiny_multi
    model.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "visual_projection.bias"}
    with pytest.raises(ValueError, match=r"missing.*visual_projection.bias"):
        RAHFModel(model.config).load_state_dict_strict(state)


def test_same_seed_same_model_different_seed_differs():
    a, _ = build_rahf("rahf-tiny", seed=3)
    b, _ = build_rahf("rahf-tiny", seed=3)
    c, _ = build_rahf("rahf-tiny", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual_projection.weight"], sc["visual_projection.weight"])


def test_padding_invariance(tiny, images):
    """One prompt alone, and padded beside a much longer one, gives the same outputs (mask over padding)."""
    model, processor = tiny
    prompt, long_prompt = "a red cat", "a red cat on a blue mat with three tiny dogs and a golden castle " * 3
    alone = run(model, processor, images[:1], [prompt])
    padded = run(model, processor, [images[0], images[1]], [prompt, long_prompt])
    for n in HEATMAP_NAMES:
        torch.testing.assert_close(padded.heatmaps[n][0], alone.heatmaps[n][0], atol=1e-5, rtol=0)
    for n in SCORE_NAMES:
        torch.testing.assert_close(padded.scores[n][0], alone.scores[n][0], atol=1e-5, rtol=0)


def test_padding_would_leak_without_the_mask(tiny_multi, images):
    """The invariance above is the mask's doing: attending to pads changes the image tokens."""
    model, processor = tiny_multi
    text = processor.tokenize(["a red cat", "a red cat on a blue mat with three tiny dogs and a golden castle"])
    tokens = model.encode_image(processor.preprocess_images(images[:1]).repeat(2, 1, 1, 1))
    with torch.no_grad():
        masked, _ = model.fuse(tokens[:1], text.input_ids[:1], text.attention_mask[:1])
        leaky, _ = model.fuse(tokens[:1], text.input_ids[:1], torch.ones_like(text.attention_mask[:1]))
        short = processor.tokenize(["a red cat"])
        ref, _ = model.fuse(tokens[:1], short.input_ids, short.attention_mask)
    torch.testing.assert_close(masked, ref, atol=1e-5, rtol=0)
    assert float((leaky - ref).abs().max()) > 1e-3


def labels_for(model, processor, prompts, word_labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s = len(prompts), model.config.image_size
    maps = {
        n: (torch.rand(b, s, s, generator=g) > 0.7).float() * torch.rand(b, 1, 1, generator=g) for n in HEATMAP_NAMES
    }
    scores = {n: torch.rand(b, generator=g) for n in SCORE_NAMES}
    targets = [processor.keyword_target(p, w) for p, w in zip(prompts, word_labels)]
    return RAHFLabels(heatmaps=maps, scores=scores, keyword_ids=processor.tokenize_targets(targets))


def test_loss_parts_and_pad_positions_ignored(tiny, images):
    model, processor = tiny
    prompts = PROMPTS[:2]
    labels = labels_for(model, processor, prompts, [[1, 0, 1, 1, 1, 0, 1], [1, 0]])
    pixels, text = model_inputs(model, processor, images[:2], prompts)
    with torch.no_grad():
        out = model(pixels, text.input_ids, text.attention_mask, labels=labels)
        assert set(out.loss_parts) == {
            *(f"heatmap/{n}" for n in HEATMAP_NAMES),
            *(f"score/{n}" for n in SCORE_NAMES),
            "tokens",
        }
        total = sum(out.loss_parts.values())
        torch.testing.assert_close(out.loss, total)
        expected = torch.mean((out.scores["overall"] - labels.scores["overall"]) ** 2)
        torch.testing.assert_close(out.loss_parts["score/overall"], expected)
        # Extra padding columns (-100) in the targets change nothing.
        ids = labels.keyword_ids
        wider = torch.cat([ids, torch.full((ids.shape[0], 5), -100)], dim=1)
        out2 = model(
            pixels, text.input_ids, text.attention_mask, labels=RAHFLabels(labels.heatmaps, labels.scores, wider)
        )
        torch.testing.assert_close(out2.loss_parts["tokens"], out.loss_parts["tokens"], atol=1e-6, rtol=0)
        # And the token loss is the mean cross-entropy over the real (non-pad) positions only.
        logits = out.keyword_logits
        real = ids != -100
        ce = torch.nn.functional.cross_entropy(logits[real], ids[real])
        torch.testing.assert_close(out.loss_parts["tokens"], ce, atol=1e-6, rtol=0)


def test_loss_weights_apply(tiny_multi, images):
    model, processor = tiny_multi
    labels = labels_for(model, processor, PROMPTS[:1], [[1] * 7])
    pixels, text = model_inputs(model, processor, images[:1], PROMPTS[:1])
    model.config.heatmap_loss_weight, model.config.score_loss_weight, model.config.token_loss_weight = 2.0, 3.0, 0.5
    with torch.no_grad():
        out = model(pixels, text.input_ids, text.attention_mask, labels=labels)
    p = out.loss_parts
    expected = (
        2.0 * sum(v for k, v in p.items() if k.startswith("heatmap/"))
        + 3.0 * sum(v for k, v in p.items() if k.startswith("score/"))
        + 0.5 * p["tokens"]
    )
    torch.testing.assert_close(out.loss, expected)


def test_overfits_four_examples(tiny, images):
    """A few dozen Adam steps on 4 examples cut the total loss by a large factor."""
    model, processor = tiny
    torch.manual_seed(0)
    prompts = ["a red cat on a mat", "two blue dogs", "a golden castle", "a tiny green frog"]
    word_labels = [[1, 0, 1, 1, 1, 1], [0, 1, 1], [1, 1, 0], [1, 0, 1, 1]]
    imgs = [*images, images[0].rotate(90)]
    labels = labels_for(model, processor, prompts, word_labels, seed=1)
    pixels, text = model_inputs(model, processor, imgs, prompts)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(40):
        out = model(pixels, text.input_ids, text.attention_mask, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] / 10, losses[::8]


def test_config_validation_and_roundtrip(tmp_path):
    cfg = preset_config("rahf-tiny", "augmented_prompt")
    cfg.save(tmp_path)
    assert RAHFConfig.load(tmp_path) == cfg
    with pytest.raises(ValueError, match="variant"):
        preset_config("rahf-tiny", "two_heads")
    with pytest.raises(ValueError, match="patch size 8"):
        RAHFConfig(vision=dict(cfg.vision), text=dict(cfg.text), heatmap_up_channels=(8, 8))
    with pytest.raises(ValueError, match="unknown RAHFConfig fields"):
        RAHFConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(KeyError, match="unknown RAHF preset"):
        preset_config("rahf-huge")


def test_richhf_base_size_matches_the_published_model():
    """At full size (meta device: no memory, no weights) the model has the reference's parameter count.

    The reference reports 642.6M with the ViT pooler (1024*1024 + 1024), which RAHF never uses; we build none.
    """
    with torch.device("meta"):
        model = RAHFModel(preset_config("richhf-base"))
    pooler = 1024 * 1024 + 1024
    assert abs(model.num_parameters() + pooler - 642.6e6) < 0.1e6, model.num_parameters()
    assert model.config.grid_size == 24 and model.config.image_size == 384


def test_head_chunks_give_same_values(tiny, images):
    """Running the heads a few maps at a time (to bound memory) changes nothing."""
    model, processor = tiny
    pixels, text = model_inputs(model, processor, images, PROMPTS)
    with torch.no_grad():
        whole = model(pixels, text.input_ids, text.attention_mask)
        chunked = model(pixels, text.input_ids, text.attention_mask, head_chunk=1)
    for n in HEATMAP_NAMES:
        torch.testing.assert_close(chunked.heatmaps[n], whole.heatmaps[n], atol=1e-6, rtol=0)
    for n in SCORE_NAMES:
        torch.testing.assert_close(chunked.scores[n], whole.scores[n], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="head_chunk"):
        model(pixels, text.input_ids, text.attention_mask, head_chunk=0)


def test_heatmap_heads_start_near_the_prior(tiny, images):
    """Random-init heatmaps start near heatmap_prior (not at 0.5), the init that keeps sparse targets learnable."""
    model, processor = tiny
    out = run(model, processor, images, PROMPTS)
    for hm in out.heatmaps.values():
        assert 0.02 < float(hm.mean()) < 0.1


@pytest.mark.slow
def test_heatmap_heads_learn_sparse_targets():
    """Heatmap-only training on sparse synthetic maps gets well below the all-zero prediction's error.

    Regression test: with the output at sigmoid(0) = 0.5 at init, this MSE collapsed onto the all-zero level
    (and stayed there: saturated sigmoid) within 40 steps.
    """
    from rahf.data.synthetic import generate

    torch.manual_seed(0)
    model, processor = build_rahf("rahf-tiny", seed=0)
    samples = list(generate(8, size=64, seed=5))
    pixels = processor.preprocess_images([s.image for s in samples])
    text = processor.tokenize([s.prompt for s in samples])
    maps = {n: torch.stack([torch.from_numpy(s.example.heatmaps[n]) for s in samples]) for n in HEATMAP_NAMES}
    zero_level = sum(float((m**2).mean()) for m in maps.values())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model.train()
    for _ in range(200):
        out = model(
            pixels, text.input_ids, text.attention_mask, scores=(), keywords=False, labels=RAHFLabels(heatmaps=maps)
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(out.loss) < 0.7 * zero_level, (float(out.loss), zero_level)


def test_channel_norm_values_and_gradients_match_the_plain_formula():
    """The in-place, x²-free channel norm equals x * rsqrt(mean_c(x²) + eps) * scale, gradients included."""
    from rahf.model import ChannelRMSNorm

    torch.manual_seed(0)
    norm = ChannelRMSNorm(6, 1e-8)
    norm.scale.data = torch.rand(6) + 0.5
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    weights = torch.randn(2, 6, 5, 5)
    (norm(x) * weights).sum().backward()
    fast = (norm(x.detach()), norm.scale.grad.clone(), x.grad.clone())
    norm.scale.grad, x.grad = None, None
    plain = x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-8) * norm.scale.view(1, -1, 1, 1)
    (plain * weights).sum().backward()
    torch.testing.assert_close(fast[0], plain.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], norm.scale.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast[2], x.grad, atol=1e-4, rtol=1e-4)


def test_heatmap_loss_weighs_empty_targets():
    from rahf.model import heatmap_loss

    pred = torch.full((2, 2, 2), 0.5)
    target = torch.zeros(2, 2, 2)
    target[0, 0, 0] = 1.0  # sample 0 has a flaw, sample 1 is flawless
    # per-sample MSE: sample 0 = (0.25 * 3 + 0.25) / 4 = 0.25, sample 1 = 0.25 as well; change sample 1's error
    pred[1] = 0.1  # sample 1 MSE = 0.01
    torch.testing.assert_close(heatmap_loss(pred, target), torch.tensor((0.25 + 0.01) / 2))
    torch.testing.assert_close(heatmap_loss(pred, target), torch.nn.functional.mse_loss(pred, target))
    # weight 4: sample 1 counts 5 times, normalised by the weight total 6
    torch.testing.assert_close(heatmap_loss(pred, target, 4.0), torch.tensor((0.25 + 5 * 0.01) / 6))
    # a batch of only flawless samples: the weights cancel
    torch.testing.assert_close(heatmap_loss(pred[1:], target[1:], 4.0), torch.tensor(0.01))
    # the gradient on false heat grows with the weight relative to the gradient on a missed flaw
    ratios = []
    for w in (0.0, 4.0):
        p = pred.clone().requires_grad_(True)
        heatmap_loss(p, target, w).backward()
        ratios.append(float(p.grad[1, 0, 0] / -p.grad[0, 0, 0]))
    assert ratios[1] == pytest.approx(5 * ratios[0])


def test_bce_heatmap_loss_by_hand():
    from rahf.model import heatmap_loss

    # one pixel per sample: target 0.25, prediction 0.5; and a flawless sample predicting 0.1
    pred, target = torch.tensor([[[0.5]], [[0.1]]]), torch.tensor([[[0.25]], [[0.0]]])
    ce0 = -(0.25 * math.log(0.5) + 0.75 * math.log(0.5))
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # the target's own entropy is taken off
    ce1 = -math.log(0.9)
    torch.testing.assert_close(heatmap_loss(pred, target, kind="bce"), torch.tensor((ce0 - h0 + ce1) / 2))
    torch.testing.assert_close(heatmap_loss(pred, target, 4.0, "bce"), torch.tensor((ce0 - h0 + 5 * ce1) / 6))
    # a perfect soft map scores 0 (up to the clamp), also at exact 0 and 1
    y = torch.tensor([[[0.0, 0.3], [0.7, 1.0]]])
    assert float(heatmap_loss(y.clone(), y, kind="bce")) < 1e-5
    # through the sigmoid the logit's gradient is (p - y) / pixels, where MSE gives 2 (p - y) p (1 - p) / pixels
    for kind, expected in (("bce", lambda p: p - y), ("mse", lambda p: 2 * (p - y) * p * (1 - p))):
        logit = torch.tensor([[[-4.0, 0.0], [1.0, 3.0]]], requires_grad=True)
        heatmap_loss(torch.sigmoid(logit), y, kind=kind).backward()
        torch.testing.assert_close(logit.grad * 4, expected(torch.sigmoid(logit.detach())))
    with pytest.raises(ValueError, match="heatmap loss must be one of"):
        heatmap_loss(pred, target, kind="l1")
    with pytest.raises(ValueError, match="field heatmap_loss: expected one of"):
        RAHFConfig(**{**preset_config("rahf-tiny").to_dict(), "heatmap_loss": "l1"})


def test_heatmap_loss_kind_reaches_the_model_loss(tiny_multi, images):
    model, processor = tiny_multi
    labels = labels_for(model, processor, PROMPTS[:2], [[1] * 7, [1, 1]])
    pixels, text = model_inputs(model, processor, images[:2], PROMPTS[:2])
    parts = {}
    for kind in ("mse", "bce"):
        model.config.heatmap_loss = kind
        with torch.no_grad():
            out = model(pixels, text.input_ids, text.attention_mask, labels=labels)
        parts[kind] = out.loss_parts["heatmap/implausibility"]
    model.config.heatmap_loss = "mse"
    from rahf.model import heatmap_loss

    target = labels.heatmaps["implausibility"]
    torch.testing.assert_close(parts["bce"], heatmap_loss(out.heatmaps["implausibility"], target, kind="bce"))
    torch.testing.assert_close(parts["mse"], heatmap_loss(out.heatmaps["implausibility"], target))
    assert float(parts["bce"]) > float(parts["mse"]) > 0


def test_per_map_heatmap_weights_scale_only_their_map(tiny_multi, images):
    model, processor = tiny_multi
    labels = labels_for(model, processor, PROMPTS[:2], [[1] * 7, [1, 1]])
    pixels, text = model_inputs(model, processor, images[:2], PROMPTS[:2])
    totals = {}
    for weights in ({}, {"misalignment": 3.0}):
        model.config.heatmap_weights = weights
        with torch.no_grad():
            out = model(pixels, text.input_ids, text.attention_mask, labels=labels)
        totals[len(weights)] = (out.loss, out.loss_parts)
    model.config.heatmap_weights = {}
    (plain, parts), (weighted, parts_w) = totals[0], totals[1]
    assert all(torch.equal(parts[k], parts_w[k]) for k in parts)  # the parts are reported unweighted
    extra = 2.0 * model.config.heatmap_loss_weight * parts["heatmap/misalignment"]
    torch.testing.assert_close(weighted, plain + extra)
    config = preset_config("rahf-tiny", overrides={"heatmap_loss_weight": 3, "heatmap_weights": {"misalignment": 2}})
    assert config.heatmap_loss_weight == 3.0 and isinstance(config.heatmap_loss_weight, float)  # ints normalised
    assert isinstance(config.heatmap_weights["misalignment"], float)
    with pytest.raises(ValueError, match="heatmap_weights names 'shadows'"):
        preset_config("rahf-tiny", overrides={"heatmap_weights": {"shadows": 1.0}})
    with pytest.raises(ValueError, match=r"field heatmap_weights\[misalignment\]: expected float >= 0"):
        preset_config("rahf-tiny", overrides={"heatmap_weights": {"misalignment": -1.0}})


def test_empty_heatmap_weight_reaches_the_loss(tiny_multi, images):
    model, processor = tiny_multi
    labels = labels_for(model, processor, PROMPTS[:2], [[1] * 7, [1, 1]])
    labels.heatmaps = {n: torch.zeros_like(v) for n, v in labels.heatmaps.items()}
    labels.heatmaps["implausibility"][0, :4, :4] = 1.0
    pixels, text = model_inputs(model, processor, images[:2], PROMPTS[:2])
    losses = []
    for w in (0.0, 9.0):
        model.config.empty_heatmap_weight = w
        with torch.no_grad():
            losses.append(model(pixels, text.input_ids, text.attention_mask, labels=labels).loss_parts)
    model.config.empty_heatmap_weight = 0.0
    # misalignment targets are all empty: weights cancel; implausibility has one flawless sample: value moves
    torch.testing.assert_close(losses[0]["heatmap/misalignment"], losses[1]["heatmap/misalignment"])
    assert abs(float(losses[0]["heatmap/implausibility"] - losses[1]["heatmap/implausibility"])) > 1e-4


def test_negative_loss_weights_are_refused():
    from rahf.model import heatmap_loss

    with pytest.raises(ValueError, match="empty_weight must be a finite number >= 0"):
        heatmap_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), -0.5)
    with pytest.raises(ValueError, match="field empty_heatmap_weight: expected a finite float, got nan"):
        RAHFConfig(**{**preset_config("rahf-tiny").to_dict(), "empty_heatmap_weight": float("nan")})


def test_itm_head_exists_only_when_weighted_and_leaves_other_weights_alone():
    plain, _ = build_rahf("rahf-tiny", seed=0)
    itm, _ = build_rahf("rahf-tiny", seed=0, config_overrides={"itm_loss_weight": 0.5})
    a, b = plain.state_dict(), itm.state_dict()
    assert {k.split(".")[0] for k in set(b) - set(a)} == {"itm_head"} and not set(a) - set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same backbone and heads: ITM is built last
    with pytest.raises(ValueError, match="itm_loss_weight > 0 needs the multi_head variant"):
        preset_config("rahf-tiny", "augmented_prompt", {"itm_loss_weight": 1.0})
    with pytest.raises(ValueError, match="field itm_loss_weight: expected float >= 0"):
        preset_config("rahf-tiny", overrides={"itm_loss_weight": -1.0})


def test_itm_pairs_targets_and_loss(images):
    """Image i is paired with its own prompt (target 1) and with prompt i - 1 (target 1 only if identical)."""
    import torch.nn.functional as F

    model, processor = build_rahf("rahf-tiny", seed=0, config_overrides={"itm_loss_weight": 2.0})
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    labels = labels_for(model, processor, prompts, [[1] * 7, [1] * 7, [1, 1]])
    pixels, text = model_inputs(model, processor, images, prompts)
    with torch.no_grad():
        out = model(pixels, text.input_ids, text.attention_mask, labels=labels)
        bare = model(pixels, text.input_ids, text.attention_mask)
    assert bare.itm_logits is None and "itm" not in bare.loss_parts  # no labels: no ITM work at inference
    assert out.itm_targets.tolist() == [1, 1, 1, 0, 1, 0]
    want = F.binary_cross_entropy_with_logits(out.itm_logits, out.itm_targets)
    torch.testing.assert_close(out.loss_parts["itm"], want)
    others = sum(v for k, v in out.loss_parts.items() if k != "itm")  # all other weights are 1.0 in the preset
    torch.testing.assert_close(out.loss, others + 2.0 * want)
    # the negatives really are the shifted prompts: the ITM logit of (image 1, prompt 0) equals (image 1, own)
    assert out.itm_logits[4] == pytest.approx(float(out.itm_logits[1]), abs=1e-5)
    assert abs(float(out.itm_logits[3] - out.itm_logits[0])) > 1e-6


def test_itm_target_alignment_makes_a_flawed_image_s_own_prompt_a_partial_match(images):
    """With itm_target "alignment" an image's own (or an identical) prompt is targeted at its alignment label."""
    model, processor = build_rahf(
        "rahf-tiny", seed=0, config_overrides={"itm_loss_weight": 1.0, "itm_target": "alignment"}
    )
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    labels = labels_for(model, processor, prompts, [[1] * 7, [1] * 7, [1, 1]])
    labels.scores["alignment"] = torch.tensor([1.0, 0.5, 0.25])
    pixels, text = model_inputs(model, processor, images, prompts)
    with torch.no_grad():
        out = model(pixels, text.input_ids, text.attention_mask, labels=labels)
    # own prompts: their alignment; shifted: image 1 with prompt 0 is its own prompt again (0.5), the rest 0
    assert out.itm_targets.tolist() == [1.0, 0.5, 0.25, 0.0, 0.5, 0.0]
    del labels.scores["alignment"]
    with pytest.raises(ValueError, match="needs alignment score labels"), torch.no_grad():
        model(pixels, text.input_ids, text.attention_mask, labels=labels)


def test_itm_model_round_trips(tmp_path):
    model, _ = build_rahf("rahf-tiny", seed=3, config_overrides={"itm_loss_weight": 1.0})
    model.save_pretrained(tmp_path / "m")
    loaded = RAHFModel.from_pretrained(tmp_path / "m")
    assert loaded.config.itm_loss_weight == 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_itm_pool_mean_max_feeds_the_head_the_grid_mean_and_max(images):
    """itm_pool="mean_max": the head reads (B, 2D), the grid's mean then its max; a saved model keeps the choice."""
    model, processor = build_rahf(
        "rahf-tiny", seed=0, config_overrides={"itm_loss_weight": 1.0, "itm_pool": "mean_max"}
    )
    d = model.config.text["d_model"]
    assert model.itm_head[0].in_features == 2 * d
    grid = torch.zeros(2, d, 4, 4)
    grid[0, 3, 1, 2] = 8.0  # one hot token: its max is 8, its mean 8 / 16
    grid[1] -= 1.0
    pooled = model._itm_pool(grid)
    assert pooled.shape == (2, 2 * d)
    assert float(pooled[0, 3]) == pytest.approx(0.5) and float(pooled[0, d + 3]) == pytest.approx(8.0)
    assert torch.equal(pooled[1], torch.full((2 * d,), -1.0))
    prompts = [PROMPTS[0], PROMPTS[1]]
    labels = labels_for(model, processor, prompts, [[1] * 7, [1, 1]])
    pixels, text = model_inputs(model, processor, images[:2], prompts)
    with torch.no_grad():
        out = model(pixels, text.input_ids, text.attention_mask, labels=labels)
        grid_own, _ = model.fuse(model.encode_image(pixels), text.input_ids, text.attention_mask)
    assert out.itm_targets.tolist() == [1, 1, 0, 0]
    torch.testing.assert_close(out.itm_logits[:2], model.itm_head(model._itm_pool(grid_own)).squeeze(1))
    plain, _ = build_rahf("rahf-tiny", seed=0, config_overrides={"itm_loss_weight": 1.0})
    assert plain.itm_head[0].in_features == d  # the default pools by the mean alone
    with pytest.raises(ValueError, match="field itm_pool: expected one of"):
        preset_config("rahf-tiny", overrides={"itm_pool": "max"})


def test_itm_negatives_limits_the_shifted_pairs(images):
    model, processor = build_rahf("rahf-tiny", seed=0, config_overrides={"itm_loss_weight": 1.0, "itm_negatives": 1})
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    labels = labels_for(model, processor, prompts, [[1] * 7, [1] * 7, [1, 1]])
    pixels, text = model_inputs(model, processor, images, prompts)
    with torch.no_grad():
        out = model(pixels, text.input_ids, text.attention_mask, labels=labels)
    assert out.itm_targets.tolist() == [1, 1, 1, 0]  # image 0 with prompt 2 only
    one = labels_for(model, processor, prompts[:1], [[1] * 7])
    with torch.no_grad():
        single = model(pixels[:1], text.input_ids[:1], text.attention_mask[:1], labels=one)
    assert single.itm_logits is None and "itm" not in single.loss_parts  # no other prompt to pair with
    with pytest.raises(ValueError, match="field itm_negatives: expected int >= 0"):
        preset_config("rahf-tiny", overrides={"itm_negatives": -1})


def test_presence_gates_exist_only_when_weighted_and_scale_each_map(images):
    plain, processor = build_rahf("rahf-tiny", seed=0)
    gated, _ = build_rahf("rahf-tiny", seed=0, config_overrides={"gate_loss_weight": 1.0})
    a, b = plain.state_dict(), gated.state_dict()
    assert {k.split(".")[0] for k in set(b) - set(a)} == {"heatmap_gates"} and not set(a) - set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the gates are built last: the rest is the same model
    bare, out = run(plain, processor, images, PROMPTS), run(gated, processor, images, PROMPTS)
    for n in HEATMAP_NAMES:
        gate = torch.sigmoid(out.gate_logits[n])
        assert gate.shape == (3,) and float((gate - 0.9).abs().max()) < 0.1  # starts near gate_init
        torch.testing.assert_close(out.heatmaps[n], bare.heatmaps[n] * gate[:, None, None])
    assert bare.gate_logits == {}
    with pytest.raises(ValueError, match="gate_loss_weight > 0 needs the multi_head variant"):
        preset_config("rahf-tiny", "augmented_prompt", {"gate_loss_weight": 1.0})


def test_gate_loss_is_the_bce_of_map_presence(images):
    import torch.nn.functional as F

    model, processor = build_rahf("rahf-tiny", seed=0, config_overrides={"gate_loss_weight": 3.0})
    labels = labels_for(model, processor, PROMPTS, [[1] * 7, [1, 1], [1] * 8])
    labels.heatmaps["implausibility"][1] = 0.0  # image 1 is flawless
    pixels, text = model_inputs(model, processor, images, PROMPTS)
    with torch.no_grad():
        out = model(pixels, text.input_ids, text.attention_mask, labels=labels)
    want = F.binary_cross_entropy_with_logits(out.gate_logits["implausibility"], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(out.loss_parts["gate/implausibility"], want)
    others = sum(v for k, v in out.loss_parts.items() if not k.startswith("gate/"))
    gates = out.loss_parts["gate/implausibility"] + out.loss_parts["gate/misalignment"]
    torch.testing.assert_close(out.loss, others + 3.0 * gates)


def fit_and_reload(model, params, inputs, labels, steps, lr, tmp_path) -> RAHFModel:
    """Adam on ``params`` for ``steps`` full-batch steps of the model's loss (no keywords), then save and load."""
    pixels, text = inputs
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(pixels, text.input_ids, text.attention_mask, labels=labels, keywords=False).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp_path / "m")
    return RAHFModel.from_pretrained(tmp_path / "m")


def test_trained_gates_darken_flawless_images_and_round_trip(images, tmp_path):
    """Trained on two flawed and one flawless image, the gates close on the flawless one, and so does its map."""
    torch.manual_seed(0)
    model, processor = build_rahf("rahf-tiny", seed=0, config_overrides={"gate_loss_weight": 1.0})
    labels = labels_for(model, processor, PROMPTS, [[1] * 7, [1, 1], [1] * 8])
    for n in HEATMAP_NAMES:
        labels.heatmaps[n][1] = 0.0
    labels.keyword_ids = None
    pixels, text = model_inputs(model, processor, images, PROMPTS)
    # only the gates learn
    loaded = fit_and_reload(model, model.heatmap_gates.parameters(), (pixels, text), labels, 60, 1e-2, tmp_path)
    assert loaded.config.gate_loss_weight == 1.0
    out = run(loaded, processor, images, PROMPTS)
    for n in HEATMAP_NAMES:
        gate = torch.sigmoid(out.gate_logits[n])
        assert float(gate[1]) < 0.1 < 0.9 < float(gate[[0, 2]].min()), (n, gate)
        assert float(out.heatmaps[n][1].max()) < 0.1 * float(out.heatmaps[n][[0, 2]].amax(dim=(1, 2)).min())


def test_prompt_reading_score_heads_start_as_the_image_only_heads_and_then_read_the_words(images, tmp_path):
    """score_reads_prompt adds one zero-initialised weight per score head: at init every output equals the plain
    model's of the same seed; once that weight moves, a score depends on the prompt's words through it, the pooled
    prompt ignores padding, and the weight survives save/load."""
    plain, processor = build_rahf("rahf-tiny", seed=0)
    reads, _ = build_rahf("rahf-tiny", seed=0, config_overrides={"score_reads_prompt": True})
    a, b = plain.state_dict(), reads.state_dict()
    assert set(b) - set(a) == {f"score_heads.{n}.prompt_weight" for n in SCORE_NAMES} and not set(a) - set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    before, same = run(plain, processor, images, PROMPTS), run(reads, processor, images, PROMPTS)
    for n in SCORE_NAMES:
        torch.testing.assert_close(same.scores[n], before.scores[n], atol=0, rtol=0)

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in SCORE_NAMES:
            w = reads.score_heads[n].prompt_weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    moved = run(reads, processor, images, PROMPTS)
    assert all(float((moved.scores[n] - before.scores[n]).abs().max()) > 1e-4 for n in SCORE_NAMES)
    # the pooled prompt is the mean and max over real tokens only: one prompt alone and padded beside a long one
    long_prompt = "a red cat on a blue mat with three tiny dogs and a golden castle " * 3
    alone = run(reads, processor, images[:1], ["a red cat"])
    padded = run(reads, processor, images[:2], ["a red cat", long_prompt])
    for n in SCORE_NAMES:
        torch.testing.assert_close(padded.scores[n][0], alone.scores[n][0], atol=1e-5, rtol=0)
    # chunked heads split the pooled prompt with the grid
    pixels, text = model_inputs(reads, processor, images, PROMPTS)
    with torch.no_grad():
        chunked = reads(pixels, text.input_ids, text.attention_mask, head_chunk=2, channels_last=True)
    for n in SCORE_NAMES:
        torch.testing.assert_close(chunked.scores[n], moved.scores[n], atol=1e-5, rtol=0)

    reads.save_pretrained(tmp_path / "m")
    loaded = RAHFModel.from_pretrained(tmp_path / "m")
    assert loaded.config.score_reads_prompt is True
    for n in SCORE_NAMES:
        torch.testing.assert_close(run(loaded, processor, images, PROMPTS).scores[n], moved.scores[n])
    with pytest.raises(ValueError, match="score_reads_prompt needs the multi_head variant"):
        preset_config("rahf-tiny", "augmented_prompt", {"score_reads_prompt": True})
    with pytest.raises(ValueError, match="pooled prompt is given exactly when"):
        plain.score_heads["alignment"](torch.zeros(1, plain.config.text["d_model"], 4, 4), torch.zeros(1, 8))


def test_pool_prompt_by_hand():
    states = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]]])  # the third token is padding
    pooled = pool_prompt(states, torch.tensor([[1, 1, 0]]))
    assert pooled.tolist() == [[2.0, 1.0, 3.0, 4.0]]


def test_word_targets_follow_the_tokens_of_each_word():
    _, processor = build_rahf("rahf-tiny", seed=0)
    prompts = ["two red circles", "a cat"]  # "circles" is two tokens here; the second row is padded
    ids = processor.tokenize(prompts).input_ids
    tokens = [processor.tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
    targets = processor.word_targets(prompts, [[1, 0, 1], [0, 1]])  # label 0 = misaligned
    assert targets.shape == ids.shape
    assert tokens[0][:5] == ["▁two", "▁red", "▁circle", "s", "</s>"]
    assert targets[0].tolist() == [0.0, 1.0, 0.0, 0.0, -1.0]  # both tokens of "circles" take its label; EOS none
    assert targets[1].tolist() == [1.0, 0.0, -1.0, -1.0, -1.0]  # EOS and padding have no word
    with pytest.raises(ValueError, match="prompt has 2 words but 3 labels"):
        processor.word_targets(["a cat"], [[1, 1, 1]])


def test_word_head_is_built_last_and_its_loss_is_the_bce_over_word_tokens(images):
    import torch.nn.functional as F

    plain, processor = build_rahf("rahf-tiny", seed=0)
    model, _ = build_rahf("rahf-tiny", seed=0, config_overrides={"word_loss_weight": 2.0})
    a, b = plain.state_dict(), model.state_dict()
    assert set(b) - set(a) == {"word_head.weight", "word_head.bias"} and not set(a) - set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # built last: the rest is the same model
    words = [[1, 0, 1, 1, 1, 0, 1], [0, 1], [1] * 8]
    labels = labels_for(model, processor, PROMPTS, words)
    labels.word_targets = processor.word_targets(PROMPTS, words)
    pixels, text = model_inputs(model, processor, images, PROMPTS)
    with torch.no_grad():
        out = model(pixels, text.input_ids, text.attention_mask, labels=labels)
        bare = plain(pixels, text.input_ids, text.attention_mask, labels=labels_for(plain, processor, PROMPTS, words))
    assert out.word_logits.shape == text.input_ids.shape and bare.word_logits is None
    real = labels.word_targets >= 0
    want = F.binary_cross_entropy_with_logits(out.word_logits[real], labels.word_targets[real])
    torch.testing.assert_close(out.loss_parts["words"], want)
    torch.testing.assert_close(out.loss, bare.loss + 2.0 * want)  # the other parts are the plain model's
    # a batch without word tokens has a zero word loss (and a graph)
    assert word_loss(torch.zeros(1, 3, requires_grad=True), torch.full((1, 3), -1.0)).item() == 0.0
    with pytest.raises(ValueError, match="model has no word head"):
        plain(pixels, text.input_ids, text.attention_mask, labels=labels)
    with pytest.raises(ValueError, match="word_loss_weight > 0 needs the multi_head variant"):
        preset_config("rahf-tiny", "augmented_prompt", {"word_loss_weight": 1.0})


def test_trained_word_head_marks_the_misaligned_words_and_round_trips(images, tmp_path):
    torch.manual_seed(0)
    model, processor = build_rahf("rahf-tiny", seed=0, config_overrides={"word_loss_weight": 1.0})
    words = [[1, 0, 1, 1, 1, 0, 1], [0, 1], [1] * 8]
    labels = RAHFLabels(word_targets=processor.word_targets(PROMPTS, words))
    pixels, text = model_inputs(model, processor, images, PROMPTS)
    loaded = fit_and_reload(model, model.parameters(), (pixels, text), labels, 40, 3e-3, tmp_path)
    assert loaded.config.word_loss_weight == 1.0
    with torch.no_grad():
        p = torch.sigmoid(loaded(pixels, text.input_ids, text.attention_mask, keywords=False).word_logits)
    t = labels.word_targets
    assert float(p[t == 1].min()) > 0.5 > float(p[t == 0].max())


@pytest.mark.parametrize("pool", ["mean", "mean_max"])
def test_edited_prompt_itm_negatives_follow_the_shifted_ones(images, pool):
    """Labels' swap rows add one negative each: the image at that row fused with its edited prompt."""
    import torch.nn.functional as F

    model, processor = build_rahf("rahf-tiny", seed=0, config_overrides={"itm_loss_weight": 1.0, "itm_pool": pool})
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    labels = labels_for(model, processor, prompts, [[1] * 7, [1, 1], [1] * 8])
    edited = processor.tokenize(["a green cat on a blue mat", "an astronaut riding a horse photo 4k detailed"])
    labels.swap_ids, labels.swap_mask, labels.swap_rows = edited.input_ids, edited.attention_mask, torch.tensor([0, 2])
    pixels, text = model_inputs(model, processor, images, prompts)
    with torch.no_grad():
        out = model(pixels, text.input_ids, text.attention_mask, labels=labels)
    assert out.itm_targets.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    torch.testing.assert_close(
        out.loss_parts["itm"], F.binary_cross_entropy_with_logits(out.itm_logits, out.itm_targets)
    )
    assert abs(float(out.itm_logits[6] - out.itm_logits[0])) > 1e-6  # the edit changes image 0's logit
    # row 2's "edit" is its own prompt cleaned (the same tokens): its logit is the positive pairing's
    assert out.itm_logits[7] == pytest.approx(float(out.itm_logits[2]), abs=1e-5)

"""Every family engine v2 serves, on a tiny random config of its architecture
(deltastore/testing.py FAMILY_CONFIGS), with the family's quirks in play (windows
shorter than the prompts, soft-caps that bite, partial and long rope, fused checkpoint
tensors): one step's forward against transformers on the same weights (logits within
fp32 rounding: atol = rtol = 1e-4), greedy generation token for token against
`generate`, and engine v2's mixed steps of three fine-tunes against each fine-tune
materialized and run by transformers, the base bit-exact after merges. A model type
outside the table is refused at startup, naming the supported ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from deltastore.compress import CompressOptions, compress
from deltastore.format import load_delta, save_delta
from deltastore.materialize import materialize
from deltastore.methods import Method
from deltastore.sources import open_finetune, open_model
from deltastore.testing import (
    FAMILY_CONFIGS,
    family_config,
    family_model,
    perturbed,
    save,
    tiny_tokenizer,
)
from server.engine.job import Job, SamplingParams
from server.engine.model_runner import SUPPORTED, UnsupportedModel, family_of
from server.engine.sequence import Sequence
from tests.server.conftest import PROMPTS, reference_texts
from tests.server.engine.stepping import forward, nan_runner
from tests.server.engine.test_llm_engine import (
    assert_base_restored,
    assert_matches_reference,
    request,
    run,
    serving,
)

TOL = dict(atol=1e-4, rtol=1e-4)
# longrope: a sequence longer than the original context gets the long factors. A full
# forward over such a sequence (and generate, which drops its cache at the crossing and
# recomputes the sequence) rotates every position by them; a server that keeps its KV
# cannot, so the runner rotates position p by the long factors from the original length
# on: the model's forward step by step over a cache, as compared below.
ROPE_BY_LENGTH = {"phi4-mini"}


def _seq(prompt: list[int], slot: int) -> Sequence:
    job = Job(None, prompt, SamplingParams(16, temperature=0.0), lambda k, p: None)
    return Sequence(job, slot, tiny_tokenizer(), {256})


def _hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _generate(model: Any, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=257
        )
    return [int(t) for t in out[0, len(prompt) :]]


def _stepwise(model: Any, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by the model's forward over its own cache, one token a step."""
    from transformers import DynamicCache

    cache, tokens = DynamicCache(config=model.config), []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), cache=cache, use_cache=True)
        for i in range(n):
            tokens.append(int(out.logits[0, -1].argmax()))
            position = torch.tensor([[len(prompt) + i]])
            out = model(torch.tensor([tokens[-1:]]), cache=cache, position_ids=position)
    return tokens


def test_the_table_covers_every_family_the_tests_build():
    assert {family_config(f).model_type for f in FAMILY_CONFIGS} == set(SUPPORTED)


@pytest.mark.parametrize("family", sorted(set(FAMILY_CONFIGS) - ROPE_BY_LENGTH))
def test_logits_equal_transformers(family):
    _check_logits(family_model(family, seed=3))


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
        dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8),
    ],
    ids=["linear", "yarn"],
)
def test_the_other_static_rope_scalings_equal_transformers(rope):
    _check_logits(family_model("llama3", seed=3, rope_parameters=rope))


def _check_logits(model: Any) -> None:
    """A prompt in two chunks (the second reaches past every window), a second prompt
    beside it, then decode rows of both: logits as transformers' full forward."""
    a_ids, b_ids = list(range(5, 19)), [40, 41, 42]
    want_a, want_b = _hf_logits(model, a_ids), _hf_logits(model, [*b_ids, 43])
    runner, how = nan_runner(model)
    a, b = _seq(a_ids[:-1], 0), _seq(b_ids, 1)
    # a's prompt in two chunks (the second reaches past every window), then b's beside it
    first = forward(runner, how, [], [(a, 9)])
    assert first.shape == (0, model.config.vocab_size)
    a.prefilled = 9
    logits = forward(runner, how, [], [(a, 4), (b, 3)])
    torch.testing.assert_close(logits[0], want_a[12], **TOL)
    torch.testing.assert_close(logits[1], want_b[2], **TOL)
    a.prefilled, b.prefilled = 13, 3
    a.ids.append(a_ids[-1])
    b.ids.append(43)
    logits = forward(runner, how, [a, b], [])  # decode rows of both
    torch.testing.assert_close(logits[0], want_a[13], **TOL)
    torch.testing.assert_close(logits[1], want_b[3], **TOL)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_greedy_tokens_equal_transformers(family):
    """Three prompts prefilled together, then decoded together, token for token as
    transformers' generate makes them one prompt at a time."""
    model = family_model(family, seed=5)
    prompts = [[7, 8, 9, 10, 11, 12], [100, 101, 102], [30, 31, 32, 33, 34, 35, 36]]
    n_new = 12
    reference = _stepwise if family in ROPE_BY_LENGTH else _generate
    want = [reference(model, p, n_new) for p in prompts]
    runner, how = nan_runner(model)
    seqs = [_seq(p, i) for i, p in enumerate(prompts)]
    logits = forward(runner, how, [], [(s, len(s.prompt)) for s in seqs])
    for s, row in zip(seqs, logits, strict=True):
        s.prefilled = len(s.prompt)
        s.ids.append(int(row.argmax()))
    while any(len(s.ids) < len(w) for s, w in zip(seqs, want, strict=True)):
        live = [s for s, w in zip(seqs, want, strict=True) if len(s.ids) < len(w)]
        logits = forward(runner, how, live, [])
        for s, row in zip(live, logits, strict=True):
            s.ids.append(int(row.argmax()))
    assert [s.ids for s in seqs] == want
    lengths = {len(p) + n_new for p in prompts}
    assert max(lengths) > 8, "the sequences pass every window and longrope's short range"


def test_a_family_outside_the_table_is_refused_naming_the_supported_ones():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=8)
    with pytest.raises(UnsupportedModel, match="'gpt2'") as e:
        family_of(cfg)
    for kind in SUPPORTED:
        assert kind in str(e.value)


def test_a_rope_that_rescales_with_the_batch_is_refused():
    model = family_model(
        "llama3", rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)
    )
    with pytest.raises(UnsupportedModel, match="dynamic"):
        nan_runner(model)


# --------------------------------------------------------------------------- engine v2


N_FAMILY_VARIANTS = 3


@pytest.fixture(scope="module", params=sorted(set(FAMILY_CONFIGS) - ROPE_BY_LENGTH))
def family_variants(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Path], dict[str | None, dict[str, str]]]:
    """A base of the family, three fine-tunes of it compressed (darex-q, p = 0.5), and
    the greedy text of every (variant, prompt) by the fine-tune materialized and run by
    transformers (None: the base)."""
    root = tmp_path_factory.mktemp(request.param)
    base_dir = save(family_model(request.param, seed=11), root / "base")
    base = open_model(base_dir)
    files: dict[str, Path] = {}
    refs = {None: reference_texts(base_dir, PROMPTS)}
    for i in range(N_FAMILY_VARIANTS):
        name = f"v{i}"
        ft_dir = save(perturbed(base.load_model(), 0.6, seed=200 + i), root / f"ft{i}")
        opts = CompressOptions(method=Method.DAREX_Q, rate=0.5, q=0.7, seed=i, progress=False)
        files[name] = root / f"{name}.delta.safetensors"
        save_delta(files[name], compress(base, open_finetune(base, ft_dir), opts))
        mat = materialize(base, load_delta(files[name]), root / f"mat{i}", progress=False)
        refs[name] = reference_texts(mat, PROMPTS)
    distinct = {tuple(r.values()) for r in refs.values()}
    assert len(distinct) == len(refs), "every fine-tune writes its own text"
    return base_dir, files, refs


@pytest.mark.parametrize("merge_policy", ["never", "always"])
def test_mixed_steps_match_every_finetune_of_the_family(family_variants, tmp_path, merge_policy):
    """Requests of the base and every variant share steps (unmerged, or beside a merged
    one); each gets its materialized fine-tune's text, and the base is bit-exact after."""
    base_dir, files, refs = family_variants
    models: list[str | None] = [None, *files]
    with serving(
        {"base": base_dir},
        files,
        tmp_path,
        max_batch_size=64,
        max_step_tokens=16,  # prompts prefill in chunks, beside the decode rows
        queue_limit=len(models) * len(PROMPTS),
        merge_policy=merge_policy,
    ) as srv:
        for name in files:  # laid out ahead, so that every request is admitted at once
            srv.engine.layout(name)
        reqs = [request(srv.engine, m, p) for p in PROMPTS for m in models]
        run(srv, reqs)
    for r in reqs:
        assert_matches_reference(r, refs)
    reg = srv.metrics.registry
    steps = reg.get_sample_value("deltaserve_step_variants_count")
    at_most_2 = reg.get_sample_value("deltaserve_step_variants_bucket", {"le": "2.0"})
    assert steps and steps - at_most_2 > 0, "no step mixed all three variants"
    merged = reg.get_sample_value("deltaserve_steps_total", {"mode": "merged"}) or 0.0
    assert (merged > 0) == (merge_policy == "always")
    assert_base_restored(srv.engine, base_dir)

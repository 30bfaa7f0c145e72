import pytest
import torch
import torch.nn.functional as F

from deltastore import calib
from deltastore.calib import (
    Objective,
    collect,
    continuations,
    generation_header,
    load_prompts,
    log_probs,
    measure,
    objectives,
    parse_objective,
    score_continuations,
)
from deltastore.compress import CompressOptions, compress
from deltastore.methods import Method
from deltastore.qsearch import QSearch
from deltastore.sources import open_finetune, open_model
from tests.conftest import make_model, perturbed, tiny_tokenizer


@pytest.fixture(scope="module")
def models():
    base = make_model(0)
    return base, perturbed(base, 0.05, seed=1)


IDS = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
PROMPTS = [IDS[0, :5].tolist(), IDS[1].tolist(), IDS[2, :11].tolist()]  # unequal: left-padded


def _full(base, ft, ids=IDS):
    """Every reference part: the base's outputs (weights) and the replies to prompts."""
    return collect(ft, ids, hidden=True, base=log_probs(base, ids), prompts=PROMPTS)[0]


def test_every_objective_is_zero_on_the_reference_model_and_positive_off_it(models):
    base, ft = models
    ref = _full(base, ft)
    assert len(ref.hidden) == ft.config.num_hidden_layers + 1  # embeddings, each layer
    same = objectives(ft, IDS, ref, tuple(Objective))
    off = objectives(base, IDS, ref, tuple(Objective))
    for o in Objective:
        if not o.minimise:  # agreement: all of the fine-tune's tokens, fewer of the base's
            assert same[o] == 1.0 and off[o] < 1.0, o
            continue
        # the hidden reference is kept in bf16: a relative error of ~2^-9 squared remains
        assert same[o] == pytest.approx(0.0, abs=1e-4), o
        assert off[o] > 100 * max(same[o], 1e-7), o


def _log_softmax(model, ids=IDS):
    with torch.no_grad():
        return F.log_softmax(model(input_ids=ids).logits.float(), -1)


def test_kl_with_its_tail_bucket_never_goes_below_zero_nor_above_the_full_kl(models):
    base, ft = models
    ref, _ = collect(ft, IDS)
    log_p = _log_softmax(ft)
    # a candidate sharper than the fine-tune on its top-64 tokens: the same logits
    # there, every other token pushed down, so it puts more mass on each of them
    sharp = (log_p + 0).scatter(-1, ref.index, 0.0)
    sharp = torch.where(sharp == 0.0, log_p, log_p - 30.0)

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, output_hidden_states=False):
            return type("Out", (), {"logits": self.logits, "hidden_states": ()})()

    got = measure(Fixed(sharp), IDS, ref, (Objective.KL,))
    assert got["kl-top"] < 0  # the top-64 sum alone is no divergence
    log_q = F.log_softmax(sharp, -1)
    full = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    assert 0 <= got["kl"] <= full + 1e-6
    # and on a real candidate, the bucketed KL is below the full one and close to it
    log_q = _log_softmax(base)
    full = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    kl = objectives(base, IDS, ref, (Objective.KL,))[Objective.KL]
    assert 0.5 * full < kl <= full + 1e-6


def test_positions_are_weighted_by_how_far_the_finetune_moved_from_the_base(models):
    base, ft = models
    ref = _full(base, ft)
    log_p, log_b = _log_softmax(ft), _log_softmax(base)
    want = (log_p.exp() * (log_p - log_b)).sum(-1)  # KL(ft || base) per position
    # the base's log-probabilities are kept in bf16: ~0.02 of rounding at log p ~ -6
    assert torch.allclose(ref.weights, want, rtol=0.05, atol=3e-3)
    assert float((ref.weights - want).abs().mean()) < 1e-3
    # the weighted KL is the KL's weighted mean: equal to it under uniform weights
    flat = type(ref)(**{**ref.__dict__, "weights": torch.ones_like(ref.weights)})
    values = measure(base, IDS, flat, (Objective.KL, Objective.WEIGHTED_KL))
    assert values["weighted-kl"] == pytest.approx(values["kl"], rel=1e-5)
    # and a candidate wrong only where the fine-tune did not move scores lower there
    # than one wrong where it did
    weighted = measure(base, IDS, ref, (Objective.KL, Objective.WEIGHTED_KL))
    assert weighted["weighted-kl"] > weighted["kl"]  # base is wrong most where ft moved


def test_prompts_are_the_text_cut_after_each_reply_header(tmp_path):
    tok = tiny_tokenizer()
    header = generation_header(tok)
    assert header == "<assistant>"  # the tiny template's reply header
    prompts = ["the cat sat", "on a mat", "and then ran"]
    chat = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(chat) + "\ntrailing text, no prompt")
    got = load_prompts(path, tok)
    assert [tok.decode(p) for p in got] == chat  # each exactly as the fine-tune saw it
    assert len(load_prompts(path, tok, n=2)) == 2
    path.write_text("no chat here, just text")
    assert load_prompts(path, tok) == []
    tok.chat_template = None
    assert generation_header(tok) == "" and load_prompts(path, tok) == []


def test_replies_are_the_finetunes_greedy_text_and_it_reproduces_them(models):
    _, ft = models
    cont = continuations(ft, PROMPTS, length=5)
    assert cont.prefix == 16 and cont.ids.shape == (3, 16 + cont.tokens.shape[1])
    for i, prompt in enumerate(PROMPTS):
        want = ft.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=0
        )
        n = int(cont.mask[i].sum())
        assert torch.equal(cont.tokens[i, :n], want[0, len(prompt) :][:n])  # padding is inert
    assert cont.ft_agreement == (1.0, 1.0)
    scores = score_continuations(ft, cont)
    assert bool(scores.hit[cont.mask].all()) and float(scores.kl.abs().max()) < 1e-4
    assert not bool(scores.hit[~cont.mask].any())
    # a reply ends at the end token: nothing after it is scored
    eos = ft.config.eos_token_id
    ended = cont.tokens == eos
    for row, m in zip(ended, cont.mask, strict=True):
        if row.any():
            assert int(m.sum()) == int(row.to(torch.int64).argmax()) + 1
    with pytest.raises(ValueError, match="no prompt"):
        continuations(ft, [])


def test_objectives_say_what_their_reference_lacks(models):
    _, ft = models
    ref, _ = collect(ft, IDS)
    with pytest.raises(ValueError, match="weighted"):
        measure(ft, IDS, ref, (Objective.WEIGHTED_KL,))
    with pytest.raises(ValueError, match="chat format"):
        measure(ft, IDS, ref, (Objective.AGREEMENT,))


def test_kl_is_the_full_vocabulary_kl_when_the_top_k_covers_it(models, monkeypatch):
    base, ft = models
    monkeypatch.setattr(calib, "TOP_K_KL", 10_000)  # more than the vocabulary
    ref, _ = collect(ft, IDS)
    got = objectives(base, IDS, ref, (Objective.KL,))[Objective.KL]
    with torch.no_grad():
        log_p = F.log_softmax(ft(input_ids=IDS).logits.float(), -1)
        log_q = F.log_softmax(base(input_ids=IDS).logits.float(), -1)
    want = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    assert got == pytest.approx(want, rel=1e-4)


def test_kl_on_the_top_64_is_close_to_the_full_kl(models):
    base, ft = models
    ref, _ = collect(ft, IDS)
    assert ref.index.shape[-1] == 64 and torch.all(ref.value[..., :-1] >= ref.value[..., 1:])
    got = objectives(base, IDS, ref, (Objective.KL,))[Objective.KL]
    with torch.no_grad():
        log_p = F.log_softmax(ft(input_ids=IDS).logits.float(), -1)
        log_q = F.log_softmax(base(input_ids=IDS).logits.float(), -1)
    full = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    assert got == pytest.approx(full, rel=0.5)  # 64 of 260 tokens hold most of the mass
    assert got > 0


def test_logit_mse_keeps_the_papers_top_5(models):
    base, ft = models
    ref, _ = collect(ft, IDS)
    with torch.no_grad():
        a, b = ft(input_ids=IDS).logits.float(), base(input_ids=IDS).logits.float()
    top = torch.topk(a, 5, -1).indices
    want = float(((torch.gather(b, -1, top) - torch.gather(a, -1, top)) ** 2).mean())
    assert calib.logit_mse(base, IDS, ref) == pytest.approx(want, rel=1e-5)


def test_hidden_objective_needs_a_hidden_reference(models):
    base, ft = models
    ref, _ = collect(ft, IDS)
    assert ref.hidden == ()
    with pytest.raises(ValueError, match="hidden"):
        objectives(base, IDS, ref, (Objective.HIDDEN,))
    with pytest.raises(ValueError, match="kl, hidden-mse"):
        parse_objective("cosine")


@pytest.mark.parametrize("objective", list(Objective))
def test_compress_searches_on_the_chosen_objective(tiny_dirs, objective):
    base = open_model(tiny_dirs["base"])
    ft = open_finetune(base, tiny_dirs["ft"])
    opts = CompressOptions(
        Method.DAREX_Q,
        0.9,
        q_search=QSearch.UNLABELLED,
        q_objective=objective,
        calib=tiny_dirs["chat_calib"],  # prompts in the chat format: the replies' objectives
        calib_tokens=256,
        seq_len=64,
        progress=False,
    )
    delta = compress(base, ft, opts)
    rec = delta.meta.q_search
    assert rec["objective"] == objective.value.replace("-", "_")
    assert rec["best_value"] == (min if objective.minimise else max)(rec["values"])
    assert rec["minimise"] == objective.minimise
    # the value recorded is that objective of the stored delta on the same tokens
    from deltastore.apply import FlatWeights, apply_delta_, bind
    from deltastore.calib import load_calibration

    ids = load_calibration(tiny_dirs["chat_calib"], base.load_tokenizer(), 256, 64)
    model = base.load_model(torch.float32)
    ref, _ = collect(
        ft.load_model(torch.float32),
        ids,
        hidden=True,
        base=log_probs(model, ids),
        prompts=load_prompts(tiny_dirs["chat_calib"], base.load_tokenizer()),
    )
    weights = FlatWeights.from_module(model)
    apply_delta_(weights, bind(delta, weights))
    got = objectives(model, ids, ref, (objective,))[objective]
    assert got == pytest.approx(rec["best_value"], rel=0.02, abs=1e-6)

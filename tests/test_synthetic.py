import torch

from openrlhf_entropic.runtime.local.engines import HFEngine
from openrlhf_entropic.runtime.local.generator import sample_responses
from openrlhf_entropic.runtime.local.learner import collate, policy_outputs
from openrlhf_entropic.tasks import synthetic


def test_correct_means_exactly_two_different_letters_of_the_set():
    prompt, label = "a b c d =", "a b c d"
    queries = [f"{prompt} {answer}" for answer in ["a b <eos>", "d a <eos>", "a a <eos>", "a e <eos>", "a <eos>",
                                                   "a b c <eos>"]]
    assert synthetic.is_correct(queries, [prompt] * 6, [label] * 6) == [True, True, False, False, False, False]


def test_reward_is_a_noisy_verifier_of_correct_answers_only():
    prompt, label = "a b c d =", "a b c d"
    torch.manual_seed(0)
    good = synthetic.reward_func([f"{prompt} a b <eos>"] * 2000, [prompt] * 2000, [label] * 2000)
    bad = synthetic.reward_func([f"{prompt} a a <eos>"] * 200, [prompt] * 200, [label] * 200)
    assert set(good) == {0.0, 1.0} and abs(sum(good) / 2000 - synthetic.SUCCESS_PROB) < 0.04
    assert set(bad) == {0.0}


def test_eval_split_is_held_out_and_tokenizer_round_trips():
    train, held_out = synthetic.make_prompts()
    assert len(train) + len(held_out) == 495 and not {r["label"] for r in train} & {r["label"] for r in held_out}
    tokenizer = synthetic.build_tokenizer()
    ids = tokenizer(train[0]["prompt"])["input_ids"]
    assert tokenizer.decode(ids) == train[0]["prompt"] and tokenizer.pad_token_id not in ids


def test_warm_start_is_cached_and_learns_the_task(tmp_path):
    model, tokenizer = synthetic.load_warm_model(tmp_path, steps=60)
    (cached,) = list(tmp_path.glob("warm_start_*.safetensors"))
    again, _ = synthetic.load_warm_model(tmp_path, steps=60)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
    assert cached.exists() and len(list(tmp_path.glob("warm_start_*"))) == 1
    train, _ = synthetic.make_prompts()
    torch.manual_seed(0)
    samples = sample_responses(HFEngine(model, tokenizer), tokenizer, train[:16], 8, 1.0, 1.0, 3, seed=0)
    verdicts = synthetic.is_correct([s.text for s in samples], [s.prompt for s in samples],
                                    [s.label for s in samples])
    assert sum(verdicts) / len(verdicts) > 0.15  # random letters would score 12/144 ~ 0.08 at best


def test_behavior_log_probs_match_the_learner_policy():
    tokenizer = synthetic.build_tokenizer()
    model = synthetic.build_model(tokenizer, seed=3).eval()
    rows = synthetic.make_prompts()[0][:4]
    torch.manual_seed(0)
    samples = sample_responses(HFEngine(model, tokenizer), tokenizer, rows, 4, 0.7, 1.0, 3, seed=0)
    batch = collate(samples, tokenizer.pad_token_id)
    with torch.no_grad():
        log_probs, _ = policy_outputs(model, batch, 0.7, 1024)
    mask = batch["mask"].bool()
    assert torch.allclose(log_probs[mask], batch["behavior_log_probs"][mask], atol=1e-5)
    # top-p truncates and renormalizes the sampling distribution, so behavior log-probs rise.
    torch.manual_seed(0)
    truncated = collate(sample_responses(HFEngine(model, tokenizer), tokenizer, rows, 4, 0.7, 0.5, 3, seed=0), tokenizer.pad_token_id)
    with torch.no_grad():
        full, _ = policy_outputs(model, truncated, 0.7, 1024)
    tmask = truncated["mask"].bool()
    assert (truncated["behavior_log_probs"][tmask] >= full[tmask] - 1e-6).all()
    assert (truncated["behavior_log_probs"][tmask] > full[tmask] + 1e-3).any()


def test_the_loss_forward_measures_the_same_entropy_as_a_separate_no_grad_pass():
    # Why the learner may read the controller's entropy from the forward its loss uses: the values
    # are the very ones a separate no-grad measuring pass gives, so the run's numbers do not move.
    tokenizer = synthetic.build_tokenizer()
    model = synthetic.build_model(tokenizer, seed=5)
    rows = synthetic.make_prompts()[0][:8]
    batch = collate(sample_responses(HFEngine(model, tokenizer), tokenizer, rows, 4, 1.0, 1.0, 3, seed=1),
                    tokenizer.pad_token_id)
    model.train()
    with_grad = policy_outputs(model, batch, 0.8, 1024)
    with torch.no_grad():
        without_grad = policy_outputs(model, batch, 0.8, 1024)
    assert with_grad[0].requires_grad
    assert torch.equal(with_grad[0].detach(), without_grad[0]) and torch.equal(with_grad[1], without_grad[1])

"""Serving personalized policies (issue 21): the batching engine, and the OpenAI-compatible server driven by the real
`openai` client against uvicorn on 127.0.0.1.

One tiny P-DPO run is trained per module (a few steps, three users: a and b majority, c minority); the other routes
(SFT, vanilla DPO, PPO, reward model) are finished run folders built directly, their user rows set far apart so
that users answer differently. The reference for every greedy answer is the project's own decoder
(`PersonalizedPolicy.generate`, through `policy.loading.generate_texts`).
"""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from common.config import load_config
from common.run import build_backbone, prepare_run_dir, save_artifacts, write_run_info
from policy.loading import generate_texts, load_policy_run
from preference_data.vocab import UserVocab
from serving.app import create_app
from serving.engine import (Admitted, Engine, GenerationRequest, QueueFull, RequestDone, SequenceDone, TextDelta)
from serving.policy import ServedPolicy
from serving.sampling import SamplingParams
from serving.server import BackgroundServer
from serving.service import chat_prompt_ids, load_service
from serving.users import UserDirectory
from tests.conftest import tiny_overrides, toy_rows, write_jsonl

CPU = torch.device("cpu")
PROMPTS = ["Tell me about rivers (0).", "What about salt?", "Tell me about bees (8), and then about clocks, please.",
           "Hi"]
USERS = (("a", "majority"), ("b", "majority"), ("c", "minority"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only waits on the other jobs of a shared machine
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------- runs


def train_tiny_pdpo(base: Path) -> Path:
    from pipelines.train_pdpo import run

    train = write_jsonl(base / "train.jsonl", toy_rows(12, users=USERS))
    ov = tiny_overrides(base, train, None, **{"train.max_steps": 4, "train.batch_size": 8,
                                              "eval.n_generation_prompts": 0})
    run(load_config(None, [o for o in ov if not o.startswith("data.eval_path")]))
    return base / "run"


def make_run(folder: Path, stage: str, kind: str = "individual", users=("a", "b"), *extra: str,
             info: dict | None = None) -> Path:
    """A finished run folder of `stage` without training: tiny-random, user rows far apart."""
    cfg = load_config(None, ["model.name=tiny-random", f"output_dir={folder}", "report_to=none",
                             f"user_model.kind={kind}", *extra])
    run_dir = prepare_run_dir(cfg)
    vocab = UserVocab(users)
    vocab.save(run_dir / "users.json")
    backbone, _ = build_backbone(cfg, len(vocab), CPU)
    heads = {}
    if kind == "individual":
        with torch.no_grad():
            backbone.user_model.implicit.offsets.weight[1:].normal_(0.0, 1.0)
    if stage == "train_rm":
        from reward.model import PersonalizedRewardModel

        heads["score"] = PersonalizedRewardModel(backbone).score
    save_artifacts(run_dir, backbone, heads)
    route = {"train_rm": "rm", "train_sft": "sft", "train_pdpo": "dpo", "train_ppo": "ppo"}[stage]
    write_run_info(run_dir, cfg, stage, backbone, vocab, extra={"route": route, **(info or {})})
    return run_dir


@pytest.fixture(scope="module")
def pdpo_run(tmp_path_factory):
    return train_tiny_pdpo(tmp_path_factory.mktemp("serve_pdpo"))


@pytest.fixture(scope="module")
def policy(pdpo_run):
    return load_policy_run(pdpo_run, CPU)


@pytest.fixture(scope="module")
def server(pdpo_run):
    service = load_service(pdpo_run, "cpu", max_batch=16, max_queue=64, max_new_tokens=1900)
    with BackgroundServer(create_app(service)) as srv:
        yield srv


def client(srv, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)


def greedy(run, prompt: str, user: str | None, max_new_tokens: int = 12):
    return generate_texts(run, [prompt], [user], max_new_tokens=max_new_tokens)[0]


def chat(c, srv, prompt, max_tokens=12, **kw):
    return c.chat.completions.create(model=srv.app.state.service.model_id, max_tokens=max_tokens,
                                     messages=[{"role": "user", "content": prompt}], **kw)


# ------------------------------------------------------------------------------------------------------- engine


class Collector:
    """A sink that records a request's events (engine unit tests step the engine in the test's own thread)."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def done(self, index: int = 0) -> SequenceDone:
        return next(e for e in self.events if isinstance(e, SequenceDone) and e.index == index)

    def streamed(self, index: int = 0) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta) and e.index == index)

    @property
    def finished(self) -> bool:
        return any(isinstance(e, RequestDone) for e in self.events)


def _submit(engine, run, prompt, user, max_tokens=12, n=1, **params):
    sink = Collector()
    req = GenerationRequest(run.encoder.prompt_ids(prompt), SamplingParams(max_tokens=max_tokens, **params), user,
                            None, n)
    return engine.submit(req, sink), sink


def _reference(run, prompts, users, max_new_tokens=12):
    """PersonalizedPolicy.generate on the same left-padded batch: the token ids every row must reproduce."""
    ids = [run.encoder.prompt_ids(p) for p in prompts]
    return run.policy.generate(ids, torch.tensor([run.user_index(u) for u in users]),
                               pad_id=run.tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
                               min_new_tokens=run.min_new_tokens, eos_token_id=run.tokenizer.eos_token_id,
                               do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0)


def test_greedy_equals_policy_generate_row_for_row(policy):
    users = ["a", "c", "nobody", "b"]
    ref = _reference(policy, PROMPTS, users)
    engine = Engine(ServedPolicy(policy), max_batch=8)
    sinks = [_submit(engine, policy, p, u, temperature=0)[1] for p, u in zip(PROMPTS, users)]
    engine.run_until_idle()
    for sink, want, u in zip(sinks, ref, users):
        done = sink.done()
        assert done.token_ids == want, u
        assert sink.streamed() == done.text  # the streamed pieces add up to the answer
        admitted = sink.events[0]
        assert isinstance(admitted, Admitted) and admitted.user.personalized == (u != "nobody")
    assert len({tuple(r) for r in ref}) == len(ref)  # the rows differ: a wrong user/prefix would show

    # continuous batching: rows that join a batch mid-flight (other lengths, other users) decode the same tokens
    engine = Engine(ServedPolicy(policy), max_batch=8)
    late = []
    _, first = _submit(engine, policy, PROMPTS[2], users[2], temperature=0)
    for k in (0, 1, 3):
        engine.step()
        engine.step()
        late.append((k, _submit(engine, policy, PROMPTS[k], users[k], temperature=0)[1]))
    engine.run_until_idle()
    assert first.done().token_ids == ref[2]
    for k, sink in late:
        assert sink.done().token_ids == ref[k], k


def test_seeded_rows_are_reproducible_whatever_their_batch(policy):
    def sample(seed, with_others):
        engine = Engine(ServedPolicy(policy), max_batch=8)
        if with_others:
            _submit(engine, policy, PROMPTS[2], "c", temperature=0.9, seed=99)
            _submit(engine, policy, PROMPTS[3], "b", temperature=0)
        _, sink = _submit(engine, policy, PROMPTS[0], "a", temperature=1.0, top_p=0.9, seed=seed)
        engine.run_until_idle()
        return sink.done().token_ids

    alone = sample(7, False)
    assert sample(7, True) == alone
    assert sample(8, False) != alone


def test_stop_strings_end_the_answer_before_them(policy):
    engine = Engine(ServedPolicy(policy), max_batch=4)
    _, sink = _submit(engine, policy, PROMPTS[0], "a", max_tokens=20, temperature=0)
    engine.run_until_idle()
    full = sink.done().text
    stop = full[5:7]
    assert stop and full.find(stop) >= 0
    _, sink = _submit(engine, policy, PROMPTS[0], "a", max_tokens=20, temperature=0, stop=("zzz-never", stop))
    engine.run_until_idle()
    done = sink.done()
    assert done.finish_reason == "stop" and done.text == full[:full.find(stop)]
    assert sink.streamed() == done.text and stop not in sink.streamed()
    assert sink.done().completion_tokens < 20


def test_n_choices(policy):
    engine = Engine(ServedPolicy(policy), max_batch=8)
    _, sampled = _submit(engine, policy, PROMPTS[1], "b", max_tokens=10, n=3, temperature=1.0, seed=1)
    _, greedy_n = _submit(engine, policy, PROMPTS[1], "b", max_tokens=10, n=2, temperature=0)
    engine.run_until_idle()
    texts = [sampled.done(i).token_ids for i in range(3)]
    assert len({tuple(t) for t in texts}) == 3  # each choice its own generator (seed + i)
    assert greedy_n.done(0).token_ids == greedy_n.done(1).token_ids == _reference(policy, [PROMPTS[1]], ["b"], 10)[0]
    assert [isinstance(e, RequestDone) for e in sampled.events].count(True) == 1


def test_cancel_frees_the_slot_and_a_full_queue_is_refused(policy):
    engine = Engine(ServedPolicy(policy), max_batch=2, max_queue=2)
    h1, s1 = _submit(engine, policy, PROMPTS[0], "a", max_tokens=500, temperature=0)
    h2, s2 = _submit(engine, policy, PROMPTS[1], "b", max_tokens=500, temperature=0)
    engine.step()
    h3, s3 = _submit(engine, policy, PROMPTS[2], "c", max_tokens=5, temperature=0)
    h4, s4 = _submit(engine, policy, PROMPTS[3], "a", max_tokens=5, temperature=0)
    with pytest.raises(QueueFull):
        _submit(engine, policy, PROMPTS[3], "a", max_tokens=5)
    engine.step()
    assert engine.running == 2 and engine.waiting == 2  # the batch is full: 3 and 4 wait
    h4.cancel()  # a waiting request leaves the queue at once
    assert engine.waiting == 1
    n_events = len(s1.events)
    h1.cancel()  # a decoding one leaves the batch at the next step, and 3 takes its slot
    engine.step()
    assert engine.running == 2 and engine.waiting == 0
    assert any(isinstance(e, Admitted) for e in s3.events)
    engine.run_until_idle()
    assert len(s1.events) == n_events and not s1.finished  # nothing more reached the cancelled request
    assert not s4.events
    assert s3.done().completion_tokens == 5 and s2.done().completion_tokens == 500


def test_a_user_table_swap_leaves_requests_in_flight_alone(policy):
    """Onboarding swaps the user table between steps: a request already decoding keeps the prefix it started
    with; the next request as that user gets the new row."""
    served = ServedPolicy(policy)
    engine = Engine(served, max_batch=4)
    generic = _reference(policy, [PROMPTS[0]], [None], 30)[0]
    _, before = _submit(engine, policy, PROMPTS[0], "newbie", max_tokens=30, temperature=0)
    for _ in range(3):
        engine.step()
    vocab = UserVocab(policy.vocab.ids + ["newbie"])
    um = copy.deepcopy(policy.policy.user_model)
    (idx,) = um.implicit.add_users(1)
    with torch.no_grad():
        um.implicit.offsets.weight[idx] = um.implicit.offsets.weight[3] * 3  # far from the generic user
    served.users = served.make_table(vocab, um)
    engine.run_until_idle()
    assert before.done().token_ids == generic and not before.events[0].user.personalized
    _, after = _submit(engine, policy, PROMPTS[0], "newbie", max_tokens=30, temperature=0)
    engine.run_until_idle()
    assert after.events[0].user.personalized and after.events[0].user.index == idx
    assert after.done().token_ids != generic


def test_ppo_runs_decode_with_their_min_new_tokens_rule(tmp_path):
    run = load_policy_run(make_run(tmp_path / "ppo", "train_ppo", "individual", ("a", "b"), "ppo.min_new_tokens=3"),
                          CPU)
    assert run.min_new_tokens == 3
    eos = run.tokenizer.eos_token_id
    # make EOS the model's first choice everywhere: only the rule keeps the answer from being empty
    hook = run.policy.backbone.lm_head.register_forward_hook(lambda m, i, out: out.index_add(
        -1, torch.tensor([eos]), torch.full(out.shape[:-1] + (1,), 50.0)))
    try:
        engine = Engine(ServedPolicy(run), max_batch=4)
        sink = Collector()
        engine.submit(GenerationRequest(run.encoder.prompt_ids("hello"),
                                        SamplingParams(max_tokens=10, temperature=0, min_tokens=run.min_new_tokens),
                                        "a"), sink)
        engine.run_until_idle()
        ref = _reference(run, ["hello"], ["a"], 10)[0]
    finally:
        hook.remove()
    assert sink.done().token_ids == ref and len(ref) == 4 and ref[-1] == eos


def test_a_bad_request_does_not_disturb_its_batch(policy):
    """A request the engine cannot decode is refused at submit; a client that breaks mid-answer (its sink raises)
    is dropped: the other rows of the batch decode exactly what they decode without them."""
    engine = Engine(ServedPolicy(policy), max_batch=8)
    with pytest.raises(ValueError, match="empty"):
        engine.submit(GenerationRequest([], SamplingParams(max_tokens=5)), Collector())
    with pytest.raises(ValueError, match="n must be"):
        engine.submit(GenerationRequest([1, 2], SamplingParams(max_tokens=5), n=9), Collector())
    with pytest.raises(ValueError, match="positions"):
        engine.submit(GenerationRequest([1, 2], SamplingParams(max_tokens=5000)), Collector())
    seen = []

    def broken(event):
        seen.append(event)
        if len(seen) == 3:
            raise RuntimeError("client went away")

    users = ["a", "c", "b"]
    good = [_submit(engine, policy, p, u, temperature=0)[1] for p, u in zip(PROMPTS, users)]
    engine.submit(GenerationRequest(policy.encoder.prompt_ids(PROMPTS[3]), SamplingParams(max_tokens=30,
                                                                                          temperature=0), "a"), broken)
    engine.run_until_idle()
    assert len(seen) == 3 and engine.running == 0  # nothing more reached the broken client; its row left
    ref = _reference(policy, PROMPTS[:3] + [PROMPTS[3]], users + ["a"])
    for sink, want in zip(good, ref):
        assert sink.done().token_ids == want


def test_chat_prompt_is_the_training_prompt(policy):
    from serving.protocol import ChatMessage

    for p in PROMPTS:
        assert chat_prompt_ids(policy.encoder, [ChatMessage(role="user", content=p)]) == policy.encoder.prompt_ids(p)


# ------------------------------------------------------------------------------------------------------- HTTP


def test_chat_and_completions_answer_as_the_user(server, policy):
    c = client(server)
    models = c.models.list().data
    assert [m.id for m in models] == [server.app.state.service.model_id] and models[0].prlhf["personalized"]
    for user in ("a", "c"):
        r = chat(c, server, PROMPTS[0], temperature=0, user=user)
        want = greedy(policy, PROMPTS[0], user)
        assert r.choices[0].message.content.strip() == want.text
        assert r.usage.completion_tokens == len(want.token_ids)
        assert r.usage.prompt_tokens == len(policy.encoder.prompt_ids(PROMPTS[0]))
        assert r.prlhf == {"user_id": user, "personalized": True}
        assert r.choices[0].finish_reason == ("stop" if want.finished else "length")
    # the two users get their own prefixes: their answers differ (and each is that user's reference answer)
    a = chat(c, server, PROMPTS[0], temperature=0, user="a").choices[0].message.content
    cc = chat(c, server, PROMPTS[0], temperature=0, extra_body={"user_id": "c"}).choices[0].message.content
    assert a != cc
    # OpenAI's `user` and extra_body's user_id are the same user
    assert chat(c, server, PROMPTS[0], temperature=0, extra_body={"user_id": "a"}).choices[0].message.content == a

    r = c.completions.create(model=server.app.state.service.model_id, prompt=[PROMPTS[1] + "\n", PROMPTS[3] + "\n"],
                             max_tokens=12, temperature=0, n=2, user="b")
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.strip() == r.choices[1].text.strip() == greedy(policy, PROMPTS[1], "b").text
    assert r.choices[2].text.strip() == greedy(policy, PROMPTS[3], "b").text
    assert r.prlhf["personalized"]


def test_an_unseen_user_gets_the_generic_user_and_is_told(server, policy):
    c = client(server)
    r = chat(c, server, PROMPTS[2], temperature=0, user="someone-new")
    assert r.prlhf == {"user_id": "someone-new", "personalized": False}
    assert r.choices[0].message.content.strip() == greedy(policy, PROMPTS[2], None).text
    r = chat(c, server, PROMPTS[2], temperature=0)  # no user at all
    assert r.prlhf == {"user_id": None, "personalized": False}


def test_streaming_chat(server, policy):
    c = client(server)
    want = chat(c, server, PROMPTS[1], temperature=0, user="c", max_tokens=16)
    chunks = list(chat(c, server, PROMPTS[1], temperature=0, user="c", max_tokens=16, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want.choices[0].message.content
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [want.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    assert chunks[0].prlhf == {"user_id": "c", "personalized": True}
    # the raw stream ends with OpenAI's sentinel
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert resp.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"


def _post(srv, body, path="/v1/chat/completions", raw=False):
    if raw:
        return httpx.post(srv.base_url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    return httpx.post(srv.base_url + path, json=body, timeout=30)


MSG = [{"role": "user", "content": "Hi"}]
BAD = [  # body, status, param, words the message must contain
    (b"{not json", 400, None, "not valid JSON"),
    ([1, 2], 400, None, "valid dictionary"),
    ({"messages": MSG, "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ({"messages": MSG, "temperature": "hot"}, 400, "temperature", "number"),
    ({"messages": MSG, "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"messages": MSG, "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"messages": MSG, "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"messages": MSG, "n": 9}, 400, "n", "limit of 8"),
    ({"messages": MSG, "stop": 5}, 400, "stop", "string"),
    ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"messages": MSG, "seed": 1.5}, 400, "seed", "integer"),
    ({"messages": MSG, "stream": "yes"}, 400, "stream", "boolean"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "'user'"),
    ({"messages": []}, 400, "messages", "at least 1"),
    ({"max_tokens": 5}, 400, "messages", "Field required"),
    ({"messages": MSG, "max_tokens": 5000}, 400, "max_tokens", "limit of 1900 (max_new_tokens)"),
    ({"messages": [{"role": "user", "content": "x" * 600}]}, 400, "messages", "limit of 128 (max_prompt_tokens)"),
    ({"messages": MSG, "user": 5.5}, 400, "user", "string"),
    ({"messages": MSG, "user": "a\nb"}, 400, "user", "control characters"),
    ({"messages": MSG, "user_id": "x" * 300}, 400, "user_id", "256"),
    ({"messages": MSG, "prompt_embeds": "AAAA"}, 400, None, "never accepts embeddings"),
    ({"messages": MSG, "frobnicate": 1}, 400, "frobnicate", "Extra inputs"),
    ({"messages": MSG, "presence_penalty": 1.0}, 400, None, "presence_penalty is not supported"),
    ({"messages": MSG, "model": "gpt-4"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_gets_its_4xx_in_openai_shape(server, body, status, param, words):
    r = _post(server, body, raw=isinstance(body, bytes))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err
    if param is not None:
        assert err["param"] == param


def test_bad_input_through_the_openai_client(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError, match="max_new_tokens"):
        chat(c, server, "Hi", max_tokens=5000)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MSG)
    r = _post(server, {"prompt": [], "max_tokens": 3}, path="/v1/completions")
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = _post(server, {"prompt": [[1, 2, 3]]}, path="/v1/completions")
    assert r.status_code == 400
    r = _post(server, {"prompt": "x", "responses": ["y"]}, path="/v1/rewards")
    assert r.status_code == 400 and "reward-model run" in r.json()["error"]["message"]
    assert httpx.get(server.base_url + "/v1/nothing-here").status_code == 404


def test_sixteen_concurrent_requests_and_bad_ones_do_not_disturb_them(server, policy):
    """16 concurrent requests from mixed users, streamed and not, with malformed ones in between: every good
    request gets exactly its own user's answer (as if decoded alone), every bad one its 4xx."""
    users = ["a", "b", "c", None, "ghost"]
    jobs = [(PROMPTS[i % 4], users[i % 5], i % 3 == 0) for i in range(16)]
    want = {(p, u): greedy(policy, p, u).text for p, u, _ in jobs}
    c = client(server)

    def good(job):
        prompt, user, stream = job
        kw = {"extra_body": {"user_id": user}} if user else {}
        if stream:
            chunks = chat(c, server, prompt, temperature=0, stream=True, **kw)
            return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        return chat(c, server, prompt, temperature=0, **kw).choices[0].message.content

    def bad(i):
        body = [BAD[i][0], {"messages": MSG, "max_tokens": 10**6}, {"messages": MSG, "top_p": 2}][i % 3]
        return _post(server, body, raw=isinstance(body, bytes)).status_code

    with ThreadPoolExecutor(max_workers=24) as pool:
        good_f = [pool.submit(good, j) for j in jobs]
        bad_f = [pool.submit(bad, i) for i in range(8)]
        answers = [f.result(timeout=120) for f in good_f]
        statuses = [f.result(timeout=120) for f in bad_f]
    assert [a.strip() for a in answers] == [want[(p, u)] for p, u, _ in jobs]
    assert all(400 <= s < 500 for s in statuses)


def test_a_client_that_disconnects_frees_its_slot(server):
    engine = server.app.state.service.engine
    tokens = engine.stats["tokens"]
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=30,
                      json={"messages": MSG, "max_tokens": 1900, "temperature": 0, "stream": True}) as resp:
        next(resp.iter_lines())  # the request is decoding
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(server.base_url + "/v1/chat/completions", timeout=0.5,
                   json={"messages": MSG, "max_tokens": 1900, "temperature": 0})
    deadline = time.monotonic() + 5
    while engine.running or engine.waiting:
        assert time.monotonic() < deadline, "the disconnected requests still hold their slots"
        time.sleep(0.05)
    assert engine.stats["tokens"] - tokens < 1900  # neither decoded to the end (one alone would be 1900)
    assert httpx.get(server.base_url + "/health").json()["queue"]["running"] == 0


def test_a_full_queue_answers_429(pdpo_run, policy):
    service = load_service(pdpo_run, "cpu", max_queue=1)
    service.engine.stop()  # nothing is decoded: the queue stays as the test fills it
    from serving.engine import Engine as E

    service.engine = E(ServedPolicy(policy), max_batch=1, max_queue=1)  # never started
    service.engine.submit(GenerationRequest([1, 2, 3], SamplingParams(max_tokens=2)), lambda e: None)
    with BackgroundServer(create_app(service)) as srv:
        with pytest.raises(openai.RateLimitError, match="queue_full|busy"):
            chat(client(srv), srv, "Hi")
        r = _post(srv, {"messages": MSG})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"


def test_info_endpoints(server):
    h = httpx.get(server.base_url + "/health").json()
    assert h["status"] == "ok" and h["route"] == "dpo" and h["queue"]["max_batch"] == 16
    users = httpx.get(server.base_url + "/v1/users").json()
    assert [u["user_id"] for u in users["data"]] == ["a", "b", "c"] and users["total"] == 3
    assert all(u["status"] == "fitted" for u in users["data"])
    assert httpx.get(server.base_url + "/v1/users", params={"limit": 1, "offset": 2}).json()["data"] == [
        {"user_id": "c", "status": "fitted"}]
    assert httpx.get(server.base_url + "/v1/users/zed").json() == {"user_id": "zed", "status": "unknown"}


def test_serve_cli_binds_loopback_by_default_and_explains_a_missing_vllm(pdpo_run, capsys):
    from pipelines.serve import build_parser, main

    args = build_parser().parse_args(["--run", "x"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.max_batch == 16 and args.backend == "hf"
    assert main(["--run", str(pdpo_run.parent / "nowhere")]) == 2
    assert "not a finished run" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: --backend vllm may well start")
    assert main(["--run", str(pdpo_run), "--backend", "vllm"]) == 2
    assert "vllm" in capsys.readouterr().err.lower()


def test_vllm_stream_keeps_the_engine_stream_contract():
    """The vLLM backend's stream, over a stand-in for vLLM's async engine: each request's events in order (admitted,
    text deltas, the finished sequence, done), the loop ends after every request's RequestDone, and a request that
    fails ends in RequestDone(error) while its neighbour completes."""
    import asyncio
    from types import SimpleNamespace

    from serving.vllm_backend import VLLMStream

    def output(text, reason):
        return SimpleNamespace(outputs=[SimpleNamespace(index=0, text=text, finish_reason=reason, token_ids=[5, 6])])

    class FakeLLM:
        async def generate(self, inputs, sampling, request_id):
            yield output("Hel", None)
            yield output("Hello", "length")

        async def abort(self, request_id):
            pass

    class FakeEngine:
        _in_flight = 0
        stats = {"requests": 0}
        llm = FakeLLM()

        def prompt_embeds(self, request, text_ids):
            if request.user == "broken":
                raise RuntimeError("no such row")
            return None, request.user

        def sampling_params(self, request):
            return None

    async def drain():
        engine = FakeEngine()
        requests = [SimpleNamespace(n=1, prompt_ids=[1, 2], user=u) for u in ("user_1", "broken")]
        events = [(k, e) async for k, e in VLLMStream(engine, requests, [[1], [2]])]
        return engine, events

    engine, events = asyncio.run(asyncio.wait_for(drain(), timeout=30))  # a stream that never ends fails, not hangs
    first = [e for k, e in events if k == 0]
    assert [type(e) for e in first] == [Admitted, TextDelta, TextDelta, SequenceDone, RequestDone]
    assert "".join(e.text for e in first if isinstance(e, TextDelta)) == "Hello"
    assert first[3].finish_reason == "length" and first[-1].error is None
    second = [e for k, e in events if k == 1]
    assert len(second) == 1 and isinstance(second[0], RequestDone) and "no such row" in second[0].error
    assert engine._in_flight == 0 and engine.stats["requests"] == 1


# ------------------------------------------------------------------------------------------------------- routes


@pytest.mark.parametrize("stage,kind,personalized,info", [
    ("train_sft", "uniform", False, {}),  # no prefix (an SFT run from before train_sft trained a prompt)
    ("train_sft", "uniform", False, {"reference_prefix": True}),  # its generic user's prompt
    ("train_pdpo", "uniform", False, {}),  # vanilla DPO
    ("train_ppo", "individual", True, {})])
def test_every_policy_route_is_served(tmp_path, stage, kind, personalized, info):
    extra = ("ppo.min_new_tokens=2",) if stage == "train_ppo" else ()
    run_dir = make_run(tmp_path / stage, stage, kind, ("a", "b"), *extra, info=info)
    run = load_policy_run(run_dir, CPU)
    assert run.uses_prefix == (stage != "train_sft" or bool(info))
    service = load_service(run_dir, "cpu", max_new_tokens=32)
    with BackgroundServer(create_app(service)) as srv:
        c = client(srv)
        answers = {}
        for user in ("a", "b"):
            r = chat(c, srv, PROMPTS[0], temperature=0, user=user)
            assert r.choices[0].message.content.strip() == greedy(run, PROMPTS[0], user).text
            assert r.prlhf["personalized"] is personalized
            answers[user] = r.choices[0].message.content
        assert (answers["a"] != answers["b"]) is personalized
        status = _post(srv, {"user_id": "new", "comparisons": [{"prompt": "p", "chosen": "a", "rejected": "b"}]},
                       path="/v1/users")
        if personalized:
            assert status.status_code == 202
        else:  # SFT and vanilla runs have no user-specific row to fit
            assert status.status_code == 400 and ("SFT" in status.text or "uniform" in status.text)


def test_reward_model_run_serves_rewards_per_user(tmp_path):
    from policy.ppo.roles import load_reward_role

    run_dir = make_run(tmp_path / "rm", "train_rm")
    reward = load_reward_role(run_dir, CPU)
    service = load_service(run_dir, "cpu")
    responses = ["Rivers matter.", "Rivers matter for many reasons, and here are several details."]
    with BackgroundServer(create_app(service)) as srv:
        got = {}
        for user in ("a", "b", "stranger"):
            r = _post(srv, {"prompt": PROMPTS[0], "responses": responses, "user": user}, path="/v1/rewards")
            assert r.status_code == 200, r.text
            body = r.json()
            want = reward.score([PROMPTS[0]] * 2, responses, [user] * 2).tolist()
            assert [d["reward"] for d in body["data"]] == pytest.approx(want, abs=1e-5)
            assert body["ranking"] == sorted([0, 1], key=lambda i: -want[i]) and body["best"] == body["ranking"][0]
            assert body["prlhf"] == {"user_id": user, "personalized": user != "stranger"}
            got[user] = want
        assert got["a"] != got["b"]
        assert _post(srv, {"prompt": "x", "responses": []}, path="/v1/rewards").status_code == 400
        long = _post(srv, {"prompt": "x", "responses": ["y" * 500]}, path="/v1/rewards")
        assert long.status_code == 400 and "data.max_response_length" in long.json()["error"]["message"]
        r = _post(srv, {"messages": MSG})
        assert r.status_code == 400 and "reward model" in r.json()["error"]["message"]
        # onboarding works for a reward model too (Bradley-Terry on the new user's comparisons)
        r = _post(srv, {"user_id": "newcomer", "comparisons": _short_comparisons(4), "steps": 5}, path="/v1/users")
        assert r.status_code == 202
        assert _wait_status(srv, "newcomer")["status"] == "fitted"
        body = _post(srv, {"prompt": PROMPTS[0], "responses": responses, "user": "newcomer"}, path="/v1/rewards").json()
        assert body["prlhf"] == {"user_id": "newcomer", "personalized": True}
        want = load_reward_role(run_dir, CPU).score([PROMPTS[0]] * 2, responses, ["newcomer"] * 2).tolist()
        assert [d["reward"] for d in body["data"]] == pytest.approx(want, abs=1e-5)
        assert want != pytest.approx(got["stranger"], abs=1e-4)  # the fitted row, not the generic user's


# ------------------------------------------------------------------------------------------------------- onboarding


def _short_comparisons(n=8):
    rows = toy_rows(n, users=(("x", "minority"),))
    return [{"prompt": r["prompt"].replace("Tell me about", "What about"), "chosen": r["chosen"],
             "rejected": r["rejected"]} for r in rows]


def _wait_status(srv, user_id, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        s = httpx.get(srv.base_url + f"/v1/users/{user_id}").json()
        if s["status"] != "pending" or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def test_onboarding_a_user_live(pdpo_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(pdpo_run, run_dir)
    service = load_service(run_dir, "cpu", onboard_steps=20, onboard_lr=0.1)
    weird = "../../evil/étoile"  # user ids are data, never paths
    with BackgroundServer(create_app(service)) as srv:
        c = client(srv)
        before = chat(c, srv, PROMPTS[0], temperature=0, user=weird)
        assert before.prlhf["personalized"] is False
        r = _post(srv, {"user_id": weird, "comparisons": _short_comparisons()}, path="/v1/users")
        assert r.status_code == 202 and r.json() == {"user_id": weird, "status": "pending"}
        assert _wait_status(srv, weird.replace("/", "%2F")) == {"user_id": weird, "status": "fitted"}
        after = chat(c, srv, PROMPTS[0], temperature=0, user=weird)
        assert after.prlhf == {"user_id": weird, "personalized": True}
        # the answer is the one the saved run gives that user: the server uses the new row
        reloaded = load_policy_run(run_dir, CPU)
        assert reloaded.vocab.index(weird) == 4
        assert after.choices[0].message.content.strip() == greedy(reloaded, PROMPTS[0], weird).text
        assert after.choices[0].message.content != before.choices[0].message.content  # not the generic answer
        # existing users are refused without overwrite; bad comparisons name the field
        r = _post(srv, {"user_id": "a", "comparisons": _short_comparisons(2)}, path="/v1/users")
        assert r.status_code == 409 and "overwrite" in r.json()["error"]["message"]
        bad = _short_comparisons(2)
        bad[1]["chosen"] = bad[1]["rejected"]
        r = _post(srv, {"user_id": "z", "comparisons": bad}, path="/v1/users")
        assert r.status_code == 400 and r.json()["error"]["param"] == "comparisons[1]"
        r = _post(srv, {"user_id": "z", "comparisons": [{"prompt": "p", "chosen": "", "rejected": "r"}]},
                  path="/v1/users")
        assert r.status_code == 400 and "comparisons[0].chosen" in r.json()["error"]["message"]
        assert _post(srv, {"user_id": "z", "comparisons": []}, path="/v1/users").status_code == 400
    names = sorted(p.name for p in run_dir.rglob("*"))
    assert not any("evil" in n or "étoile" in n for n in names)
    assert weird in json.loads((run_dir / "users.json").read_text())["users"]


def test_onboarding_jobs_pending_duplicate_busy_and_failed(tmp_path):
    release = threading.Event()

    def broken(*args, **kwargs):
        release.wait(10)
        raise ValueError("no luck")

    vocab = UserVocab(["a"])
    d = UserDirectory(tmp_path, lambda: vocab, lambda *a: None, adapt=broken, max_pending=2)
    one = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    assert d.onboard("n", one) == {"user_id": "n", "status": "pending"}
    assert d.status("n") == {"user_id": "n", "status": "pending"}
    with pytest.raises(ValueError, match="already being onboarded"):
        d.onboard("n", one)
    d.onboard("m", one)
    with pytest.raises(ValueError, match="already waiting") as exc:
        d.onboard("k", one)
    assert exc.value.status == 429
    assert [u["user_id"] for u in d.list(10, 0)["data"]] == ["a", "n", "m"]
    release.set()
    deadline = time.monotonic() + 10
    while d.status("n")["status"] == "pending" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert d.status("n") == {"user_id": "n", "status": "failed", "error": "no luck"}
    assert d.status("a")["status"] == "fitted" and d.status("q")["status"] == "unknown"
    d.close()

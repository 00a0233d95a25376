"""Interoperability tests: the official `openai` Python SDK against codex_responses_proxy.

Each test starts the fake chatgpt.com codex backend, the fake OAuth server and the proxy in this
process (the harness of test_codex_responses_proxy.py), points `openai.OpenAI` at the proxy and
checks what a user of the SDK sees: parsed responses, streamed events, typed exceptions.

The module needs the `openai` package and skips itself without it, so `python3 -m unittest -v`
stays standard-library only. To run it (e.g. from .ci/run):

    python -m venv v && v/bin/pip install openai && v/bin/python -m unittest test_interop -v

The Node clients (the `openai` Node SDK, the Vercel AI SDK) run from interop/, with its
pinned packages installed (`npm ci` there) and $NODE22 naming a Node 22 binary; without
them those tests skip.
"""

import asyncio
import base64
import json
import os
import shutil
import struct
import subprocess
import tempfile
import unittest
import zlib
from unittest import mock

try:
    import openai
except ImportError:  # the whole module skips; the main suite needs no third-party package
    openai = None

try:  # responses.connect() needs it (openai[realtime]); the Agents SDK brings it too
    import websockets
except ImportError:
    websockets = None

try:
    import agents
except ImportError:
    agents = None

try:
    import anthropic
except ImportError:
    anthropic = None

import test_codex_responses_proxy as harness
from test_codex_responses_proxy import (Reply, USAGE, function_call_item, message_item,
                                        stream_frames)

NO_SDK = "the openai SDK is not installed"
# Node clients: the scripts and their pinned packages in interop/ (npm ci there), run with the
# Node 22 binary named by $NODE22.
NODE = os.environ.get("NODE22")
NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interop")
NO_NODE = ("set NODE22 to a Node 22 binary and run `npm ci` in interop/ for the Node "
           "clients' interop tests")
NODE_READY = bool(NODE) and os.path.isdir(os.path.join(NODE_DIR, "node_modules"))
NO_WEBSOCKETS = "the openai SDK or websockets (openai[realtime]) is not installed"
NO_AGENTS = "the OpenAI Agents SDK (openai-agents) is not installed"
MODEL = "gpt-5.1-codex"
TEXT = "Hello from the fake backend!"
WEATHER_TOOL_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}


class ScriptedCase(harness.ProxyTestCase):
    """The proxy harness with the backend's answers queued and its requests read back."""

    def script(self, items=None, **kwargs):
        """Queue one backend stream answering these output items (default: one message)."""
        if items is None:
            items = [message_item(TEXT)]
        self.backend.replies.append(Reply(frames=stream_frames(items=items, **kwargs)))

    def sent(self, index=-1):
        """The JSON body the backend received."""
        return self.backend.requests[index]["body"]


class SDKTestCase(ScriptedCase):
    """The proxy harness plus an openai SDK client pointed at it."""

    def setUp(self):
        super().setUp()
        self.client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % self.port,
                                    api_key="unused", max_retries=0, timeout=10)
        self.addCleanup(self.client.close)


def weather_tool_responses():
    return {"type": "function", "name": "get_weather", "description": "The weather in a city.",
            "parameters": WEATHER_TOOL_PARAMETERS}


def weather_tool_chat():
    return {"type": "function", "function": {"name": "get_weather",
                                             "description": "The weather in a city.",
                                             "parameters": WEATHER_TOOL_PARAMETERS}}


# --------------------------------------------------------------------------------------------
# Responses API
# --------------------------------------------------------------------------------------------

@unittest.skipIf(openai is None, NO_SDK)
class ResponsesInteropTests(SDKTestCase):

    def test_create_returns_text_usage_and_status(self):
        self.script()
        resp = self.client.responses.create(model=MODEL, input="say hi")
        self.assertEqual(resp.output_text, TEXT)
        self.assertEqual(resp.status, "completed")
        self.assertEqual(resp.model, MODEL)
        self.assertEqual(resp.usage.input_tokens, USAGE["input_tokens"])
        self.assertEqual(resp.usage.output_tokens, USAGE["output_tokens"])
        self.assertEqual(resp.usage.total_tokens, USAGE["total_tokens"])
        self.assertEqual(resp.usage.input_tokens_details.cached_tokens,
                         USAGE["input_tokens_details"]["cached_tokens"])
        self.assertEqual(resp.usage.output_tokens_details.reasoning_tokens,
                         USAGE["output_tokens_details"]["reasoning_tokens"])
        self.assertEqual(len(self.backend.requests), 1)
        self.assertEqual(self.sent()["input"][0]["content"][0]["text"], "say hi")

    def test_create_stream_yields_deltas_and_filled_completed_event(self):
        self.script()
        with self.client.responses.create(model=MODEL, input="say hi", stream=True) as stream:
            events = list(stream)
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        self.assertGreater(len(deltas), 1)
        self.assertEqual("".join(deltas), TEXT)
        self.assertEqual(events[0].type, "response.created")
        last = events[-1]
        self.assertEqual(last.type, "response.completed")
        self.assertEqual(last.response.status, "completed")
        self.assertEqual([item.type for item in last.response.output], ["message"])
        self.assertEqual(last.response.output[0].content[0].text, TEXT)
        self.assertEqual(last.response.output_text, TEXT)
        self.assertEqual(last.response.usage.input_tokens, USAGE["input_tokens"])

    def test_stream_helper_final_response(self):
        self.script()
        seen = []
        with self.client.responses.stream(model=MODEL, input="say hi") as stream:
            for event in stream:
                seen.append(event.type)
            final = stream.get_final_response()
        self.assertIn("response.output_text.delta", seen)
        self.assertEqual(seen[-1], "response.completed")
        self.assertEqual(final.output_text, TEXT)
        self.assertEqual(final.status, "completed")

    def test_function_tool_round_trip(self):
        self.script(items=[function_call_item()])
        tools = [weather_tool_responses()]
        first = self.client.responses.create(model=MODEL, input="weather in Paris?",
                                             tools=tools)
        calls = [item for item in first.output if item.type == "function_call"]
        self.assertEqual(len(calls), 1, first.output)
        call = calls[0]
        self.assertEqual((call.name, call.arguments, call.call_id),
                         ("get_weather", '{"city": "Paris"}', "call_1"))
        self.assertEqual(json.loads(call.arguments), {"city": "Paris"})
        self.assertEqual(self.sent()["tools"][0]["name"], "get_weather")

        self.script(items=[message_item("It is sunny in Paris.")])
        follow_up = [{"role": "user", "content": "weather in Paris?"}]
        follow_up += [item.model_dump(exclude_none=True) for item in first.output]
        follow_up.append({"type": "function_call_output", "call_id": "call_1",
                          "output": "sunny"})
        second = self.client.responses.create(model=MODEL, input=follow_up, tools=tools)
        self.assertEqual(second.output_text, "It is sunny in Paris.")
        self.assertEqual(len(self.backend.requests), 2)
        sent_input = self.sent()["input"]
        sent_calls = [i for i in sent_input if i.get("type") == "function_call"]
        outputs = [i for i in sent_input if i.get("type") == "function_call_output"]
        self.assertEqual([(c["call_id"], c["name"]) for c in sent_calls],
                         [("call_1", "get_weather")])
        self.assertEqual([(o["call_id"], o["output"]) for o in outputs], [("call_1", "sunny")])

    def test_usage_limit_429_is_rate_limit_error_with_reset(self):
        self.backend.replies.append(Reply(status=429, body=json.dumps({"error": {
            "type": "usage_limit_reached", "message": "The usage limit has been reached",
            "plan_type": "plus", "resets_in_seconds": 3600}}).encode()))
        with self.assertRaises(openai.RateLimitError) as caught:
            self.client.responses.create(model=MODEL, input="say hi")
        err = caught.exception
        self.assertEqual(err.status_code, 429)
        self.assertIn("usage limit", err.message)
        self.assertIn("resets at", err.message)
        self.assertIn("1 h 0 min", err.message)
        self.assertEqual(len(self.backend.requests), 1, "max_retries=0 yet the SDK retried")

    def test_context_length_failure_is_bad_request_error(self):
        self.backend.replies.append(Reply(frames=stream_frames(
            items=[], terminal="response.failed", terminal_extra={"error": {
                "code": "context_length_exceeded",
                "message": "Your input exceeds the context window of this model."}})))
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.responses.create(model=MODEL, input="a very long prompt")
        err = caught.exception
        self.assertEqual(err.status_code, 400)
        self.assertEqual(err.code, "context_length_exceeded")
        self.assertIn("context window", err.message)


@unittest.skipIf(openai is None, NO_SDK)
class StoredResponsesInteropTests(SDKTestCase):
    """The SDK's calls on responses the proxy answered: retrieve, input_items, delete, a
    chain with `store` left at its default, compact, and what the subscription cannot do."""

    def turn(self, resp_id, text, **kwargs):
        self.backend.replies.append(Reply(frames=harness.with_id(stream_frames(
            items=[message_item("answer " + text, "msg_" + resp_id)]), resp_id)))
        return self.client.responses.create(model=MODEL, input=text, **kwargs)

    def test_two_turn_chain_with_store_left_at_its_default(self):
        first = self.turn("resp_1", "q1")
        second = self.turn("resp_2", "q2", previous_response_id=first.id)
        self.assertEqual((first.id, second.id), ("resp_1", "resp_2"))
        self.assertEqual(second.output_text, "answer q2")
        texts = [item["content"][0]["text"] for item in self.sent()["input"]]
        self.assertEqual(texts, ["q1", "answer q1", "q2"])
        self.assertNotIn("previous_response_id", self.sent())
        # streamed, the same
        self.backend.replies.append(Reply(frames=harness.with_id(stream_frames(
            items=[message_item("answer q3", "msg_resp_3")]), "resp_3")))
        with self.client.responses.stream(model=MODEL, input="q3",
                                          previous_response_id=second.id) as stream:
            final = stream.get_final_response()
        self.assertEqual((final.id, final.output_text), ("resp_3", "answer q3"))
        self.assertEqual(len(self.sent()["input"]), 5)

    def test_retrieve_input_items_and_delete(self):
        first = self.turn("resp_1", "q1")
        self.turn("resp_2", "q2", previous_response_id=first.id)
        got = self.client.responses.retrieve("resp_2")
        self.assertEqual((got.id, got.status, got.output_text), ("resp_2", "completed",
                                                                 "answer q2"))
        self.assertEqual(got.usage.input_tokens, USAGE["input_tokens"])
        page = self.client.responses.input_items.list("resp_2")
        self.assertEqual([item.type for item in page.data], ["message"] * 3)
        self.assertEqual([item.role for item in page.data], ["user", "assistant", "user"])
        self.assertEqual(page.data[0].content[0].text, "q2", "newest first by default")
        # the SDK's auto-pagination follows `after` page by page
        ordered = list(self.client.responses.input_items.list("resp_2", limit=1, order="asc"))
        self.assertEqual([item.id for item in ordered], [item.id for item in page.data][::-1])
        self.assertIsNone(self.client.responses.delete("resp_1"))
        for call in (lambda: self.client.responses.retrieve("resp_1"),
                     lambda: self.client.responses.delete("resp_1"),
                     lambda: self.client.responses.input_items.list("resp_1")):
            with self.assertRaises(openai.NotFoundError) as caught:
                call()
            self.assertIn("resp_1", caught.exception.message)
        with self.assertRaises(openai.BadRequestError) as caught:
            self.turn("resp_x", "again", previous_response_id="resp_1")
        self.assertEqual(caught.exception.code, "previous_response_not_found")
        self.assertEqual(self.client.responses.retrieve("resp_2").id, "resp_2",
                         "a response continuing a deleted one stays")

    def test_store_false_is_not_kept(self):
        first = self.turn("resp_1", "q1", store=False)
        with self.assertRaises(openai.NotFoundError):
            self.client.responses.retrieve(first.id)
        with self.assertRaises(openai.BadRequestError) as caught:
            self.turn("resp_2", "q2", previous_response_id=first.id)
        self.assertEqual(caught.exception.code, "previous_response_not_found")

    def test_compact(self):
        history = [{"role": "user", "content": "q1"},
                   {"role": "assistant", "content": "a1"}]
        compacted = self.client.responses.compact(model=MODEL, input=history,
                                                  instructions="Summarize.")
        self.assertEqual(compacted.object, "response.compaction")
        self.assertTrue(compacted.id)
        self.assertEqual([item.type for item in compacted.output], ["message", "compaction"])
        self.assertEqual(compacted.output[-1].encrypted_content, "gAAAA-compacted-history")
        got = self.backend.requests[-1]
        self.assertEqual(got["path"], "/backend-api/codex/responses/compact")
        self.assertEqual(got["body"]["input"][0]["content"], "q1")
        # from a stored response, by previous_response_id
        first = self.turn("resp_1", "q1")
        self.client.responses.compact(model=MODEL, previous_response_id=first.id)
        self.assertEqual([item.get("role") for item in self.sent()["input"]],
                         ["user", "assistant"])

    def test_cancel_and_input_tokens_are_bad_requests_that_say_why(self):
        first = self.turn("resp_1", "q1")
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.responses.cancel(first.id)
        self.assertIn("background", caught.exception.message)
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.responses.input_tokens.count(model=MODEL, input="hi")
        self.assertIn("subscription", caught.exception.message)
        self.assertEqual(len(self.backend.requests), 1)


@unittest.skipIf(openai is None, NO_SDK)
class ModelsInteropTests(SDKTestCase):

    def setUp(self):
        super().setUp()
        harness.add_models_endpoint(self.backend)

    def test_models_list_has_only_listed_models(self):
        models = list(self.client.models.list())
        self.assertEqual([m.id for m in models], ["gpt-5.1-codex", "gpt-5-codex-mini"])
        for model in models:
            self.assertEqual(model.object, "model")
            self.assertIsInstance(model.created, int)
            self.assertIsInstance(model.owned_by, str)


# --------------------------------------------------------------------------------------------
# Images, and reasoning effort in a model name
# --------------------------------------------------------------------------------------------

def tiny_png():
    """A real 1x1 PNG: the Codex CLI decodes the image it is given."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\xff")) + chunk(b"IEND", b""))


@unittest.skipIf(openai is None, NO_SDK)
class ImagesInteropTests(SDKTestCase):
    """client.images.generate() and .edit() (a multipart form) on the subscription."""

    def test_generate_returns_base64_images(self):
        result = self.client.images.generate(prompt="a red fox", size="1024x1536", n=2,
                                             quality="high")
        self.assertEqual([base64.b64decode(d.b64_json) for d in result.data],
                         [b"img:a red fox:0", b"img:a red fox:1"])
        self.assertEqual((result.size, result.quality, result.output_format),
                         ("1024x1536", "high", "png"))
        self.assertEqual(self.sent(), {"prompt": "a red fox", "size": "1024x1536", "n": 2,
                                       "quality": "high", "model": "gpt-image-2"})

    def test_edit_sends_the_files_as_data_urls(self):
        png = tiny_png()
        result = self.client.images.edit(
            image=[("a.png", png, "image/png"), ("b.png", png, "image/png")],
            mask=("m.png", png, "image/png"), prompt="add a hat", model="gpt-image-1.5")
        self.assertEqual(base64.b64decode(result.data[0].b64_json), b"img:add a hat:0")
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        self.assertEqual(self.sent(), {"prompt": "add a hat", "model": "gpt-image-1.5",
                                       "images": [{"image_url": url}] * 2,
                                       "mask": {"image_url": url}})
        self.assertEqual(self.backend.requests[-1]["path"], "/backend-api/codex/images/edits")

    def test_url_answers_and_usage_limits_are_typed_errors(self):
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.images.generate(prompt="p", response_format="url")
        self.assertEqual(cm.exception.body["param"], "response_format")
        self.backend.replies.append(Reply(status=429, body=json.dumps({"error": {
            "type": "usage_limit_reached", "message": "The usage limit has been reached",
            "resets_in_seconds": 60}}).encode()))
        with self.assertRaises(openai.RateLimitError) as cm:
            self.client.images.edit(image=("a.png", tiny_png(), "image/png"), prompt="p")
        self.assertIn("usage limit", str(cm.exception))


@unittest.skipIf(openai is None, NO_SDK)
class EffortInModelNameInteropTests(SDKTestCase):
    """A model name with an effort, from SDK clients that set no reasoning themselves."""

    def setUp(self):
        super().setUp()
        harness.add_models_endpoint(self.backend)

    def test_responses_and_chat_with_effort_in_the_name(self):
        self.script()
        self.client.responses.create(model="gpt-5.1-codex-high", input="hi")
        self.assertEqual((self.sent()["model"], self.sent()["reasoning"]),
                         (MODEL, {"effort": "high"}))
        self.script()
        self.client.chat.completions.create(model="gpt-5.1-codex(low)",
                                            messages=[{"role": "user", "content": "hi"}])
        self.assertEqual((self.sent()["model"], self.sent()["reasoning"]),
                         (MODEL, {"effort": "low"}))
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.responses.create(model="gpt-5.1-codex-xhigh", input="hi")
        self.assertIn("low, high", str(cm.exception))


# --------------------------------------------------------------------------------------------
# Node clients: the openai SDK and the Vercel AI SDK
# --------------------------------------------------------------------------------------------

@unittest.skipUnless(NODE_READY, NO_NODE)
class NodeInteropTests(harness.ProxyTestCase):
    """Each test runs one script of interop/ against the proxy and the fake backend."""

    def run_script(self, name, *args):
        """The script's JSON lines, once it exited 0."""
        proc = subprocess.run([NODE, os.path.join(NODE_DIR, name),
                               "http://127.0.0.1:%d/v1" % self.port] + list(args),
                              cwd=NODE_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=120, env=dict(os.environ, NO_COLOR="1"))
        out = proc.stdout.decode("utf-8", "replace")
        self.assertEqual(proc.returncode, 0, "%s failed:\n%s\n%s\nproxy log:\n%s" % (
            name, out, proc.stderr.decode("utf-8", "replace")[-3000:], self.log_text()))
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def script(self, resp_id, items):
        self.backend.replies.append(Reply(frames=harness.with_id(stream_frames(items=items),
                                                                 resp_id)))

    def test_openai_sdk_create_stream_retrieve_input_items_compact_delete(self):
        self.script("resp_1", [message_item("answer one", "msg_1")])
        self.script("resp_2", [message_item("answer two", "msg_2")])
        steps = {line["step"]: line for line in self.run_script("openai_sdk.mjs")}
        self.assertEqual(steps["create"], {"step": "create", "id": "resp_1",
                                           "text": "answer one", "status": "completed"})
        self.assertEqual(steps["stream"], {"step": "stream", "id": "resp_2",
                                           "text": "answer two"})
        self.assertEqual(steps["retrieve"], {"step": "retrieve", "id": "resp_2",
                                             "text": "answer two", "status": "completed"})
        self.assertEqual([(i["type"], i["role"]) for i in steps["input_items"]["items"]],
                         [("message", "user"), ("message", "assistant"), ("message", "user")])
        self.assertEqual(steps["input_items"]["items"][1]["id"], "msg_1")
        self.assertEqual(steps["compact"]["object"], "response.compaction")
        self.assertEqual(steps["compact"]["types"], ["message", "message", "compaction"])
        self.assertEqual(steps["delete"]["retrieve_after"], 404)
        paths = [r["path"] for r in self.backend.requests]
        self.assertEqual(paths, ["/backend-api/codex/responses"] * 2
                         + ["/backend-api/codex/responses/compact"])
        texts = [item["content"][0]["text"] for item in self.backend.requests[1]["body"]["input"]]
        self.assertEqual(texts, ["q1", "answer one", "q2"])

    def test_vercel_ai_sdk_multi_turn_conversation_with_item_references(self):
        received = []
        store = self.proxy.app.conversations
        expand = store.expand_references

        def recording(items, *rest):  # what the client sent, before the proxy expands it
            received.append(json.loads(json.dumps(items)))
            return expand(items, *rest)

        store.expand_references = recording
        for turn in (1, 2, 3):
            reasoning = {"type": "reasoning", "id": "rs_%d" % turn, "summary": [],
                         "encrypted_content": "gAAAA-turn-%d" % turn}
            self.script("resp_%d" % turn, [reasoning, message_item("answer %d" % turn,
                                                                   "msg_%d" % turn)])
        lines = self.run_script("ai_sdk_conversation.mjs", "3")
        self.assertEqual([line["text"] for line in lines], ["answer 1", "answer 2", "answer 3"])
        references = [[item["id"] for item in items if item.get("type") == "item_reference"]
                      for items in received]
        self.assertEqual(references[1:], [["rs_1", "msg_1"], ["rs_1", "msg_1", "rs_2", "msg_2"]],
                         "the SDK did not send item references: %r" % received)
        sent = self.backend.requests[-1]["body"]["input"]
        self.assertNotIn("item_reference", json.dumps(sent))
        self.assertEqual([(item.get("type", "message"), item.get("role")) for item in sent], [
            ("message", "user"), ("reasoning", None), ("message", "assistant"),
            ("message", "user"), ("reasoning", None), ("message", "assistant"),
            ("message", "user")])
        self.assertEqual([item["encrypted_content"] for item in sent
                          if item.get("type") == "reasoning"], ["gAAAA-turn-1", "gAAAA-turn-2"])
        self.assertEqual(sent[2]["content"][0]["text"], "answer 1")


# --------------------------------------------------------------------------------------------
# Chat Completions
# --------------------------------------------------------------------------------------------

@unittest.skipIf(openai is None, NO_SDK)
class ChatCompletionsInteropTests(SDKTestCase):

    def test_create_text_usage_and_system_prompt(self):
        self.script()
        completion = self.client.chat.completions.create(model=MODEL, messages=[
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
        self.assertEqual(completion.object, "chat.completion")
        self.assertEqual(completion.model, MODEL)
        self.assertEqual(len(completion.choices), 1)
        choice = completion.choices[0]
        self.assertEqual(choice.message.role, "assistant")
        self.assertEqual(choice.message.content, TEXT)
        self.assertEqual(choice.finish_reason, "stop")
        self.assertFalse(choice.message.tool_calls)
        self.assertEqual(completion.usage.prompt_tokens, USAGE["input_tokens"])
        self.assertEqual(completion.usage.completion_tokens, USAGE["output_tokens"])
        self.assertEqual(completion.usage.total_tokens, USAGE["total_tokens"])
        body = self.sent()
        self.assertFalse([i for i in body["input"] if i.get("role") == "system"], body)
        # a leading system message becomes the instructions (README), not an input item
        self.assertEqual(body["instructions"], "be brief", body)
        self.assertFalse([i for i in body["input"] if "be brief" in json.dumps(i)], body)
        self.assertTrue(any(i.get("role") == "user" and "hi" in json.dumps(i.get("content"))
                            for i in body["input"]), body)

    def test_stream_with_usage(self):
        self.script()
        stream = self.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        with stream:
            chunks = list(stream)  # ends cleanly: no exception, the iterator finishes
        self.assertTrue(chunks)
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        self.assertTrue(deltas)
        self.assertEqual(deltas[0].role, "assistant")
        self.assertEqual("".join(d.content or "" for d in deltas), TEXT)
        finishes = [c.choices[0].finish_reason for c in chunks
                    if c.choices and c.choices[0].finish_reason]
        self.assertEqual(finishes, ["stop"])
        self.assertEqual(chunks[-1].choices, [])
        usage = chunks[-1].usage
        self.assertIsNotNone(usage)
        self.assertEqual(usage.prompt_tokens, USAGE["input_tokens"])
        self.assertEqual(usage.completion_tokens, USAGE["output_tokens"])
        self.assertEqual(len({c.id for c in chunks}), 1, "chunks of one completion share an id")
        for chunk in chunks:
            self.assertEqual(chunk.object, "chat.completion.chunk")

    def test_tool_call_non_streaming(self):
        self.script(items=[function_call_item()])
        completion = self.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "weather in Paris?"}],
            tools=[weather_tool_chat()])
        choice = completion.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        calls = choice.message.tool_calls
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0].id, "call_1")
        self.assertEqual(calls[0].type, "function")
        self.assertEqual(calls[0].function.name, "get_weather")
        self.assertEqual(calls[0].function.arguments, '{"city": "Paris"}')
        tools = self.sent()["tools"]
        self.assertEqual(len(tools), 1)
        # the Responses form: flat, no nested "function"
        self.assertEqual(tools[0]["name"], "get_weather")
        self.assertNotIn("function", tools[0])
        self.assertEqual(tools[0]["type"], "function")

    def test_tool_call_streaming(self):
        self.script(items=[function_call_item()])
        stream = self.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "weather in Paris?"}],
            tools=[weather_tool_chat()], stream=True)
        calls = {}
        finishes = []
        with stream:
            for chunk in stream:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
                for delta in choice.delta.tool_calls or []:
                    call = calls.setdefault(delta.index, {"id": "", "name": "",
                                                          "arguments": ""})
                    call["id"] += delta.id or ""
                    if delta.function is not None:
                        call["name"] += delta.function.name or ""
                        call["arguments"] += delta.function.arguments or ""
        self.assertEqual(list(calls), [0])
        self.assertEqual(calls[0], {"id": "call_1", "name": "get_weather",
                                    "arguments": '{"city": "Paris"}'})
        self.assertEqual(finishes, ["tool_calls"])

    def test_tool_result_follow_up(self):
        self.script(items=[message_item("It is sunny in Paris.")])
        completion = self.client.chat.completions.create(model=MODEL, tools=[weather_tool_chat()],
                                                         messages=[
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
        self.assertEqual(completion.choices[0].message.content, "It is sunny in Paris.")
        self.assertEqual(completion.choices[0].finish_reason, "stop")
        sent_input = self.sent()["input"]
        calls = [i for i in sent_input if i.get("type") == "function_call"]
        outputs = [i for i in sent_input if i.get("type") == "function_call_output"]
        self.assertEqual([(c.get("call_id"), c.get("name"), c.get("arguments")) for c in calls],
                         [("call_1", "get_weather", '{"city": "Paris"}')])
        self.assertEqual([o.get("call_id") for o in outputs], ["call_1"])
        self.assertIn("sunny", json.dumps(outputs[0].get("output")))
        types = [i.get("type") or i.get("role") for i in sent_input]
        self.assertLess(types.index("function_call"), types.index("function_call_output"))

    def test_n_above_one_is_bad_request(self):
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
        error = caught.exception
        self.assertEqual(error.status_code, 400)
        self.assertEqual((error.code, error.param), ("invalid_value", "n"), error.body)
        self.assertEqual(self.backend.requests, [], "the request reached the backend")


# --------------------------------------------------------------------------------------------
# Anthropic Messages: the anthropic Python SDK and Claude Code
# --------------------------------------------------------------------------------------------

NO_ANTHROPIC = "the anthropic SDK is not installed"
CLAUDE_MODEL = "claude-opus-5-5"
WEATHER_TOOL_ANTHROPIC = {"name": "get_weather", "description": "The weather in a city.",
                          "input_schema": WEATHER_TOOL_PARAMETERS}
PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU"
           "5ErkJggg==")


@unittest.skipIf(anthropic is None, NO_ANTHROPIC)
class AnthropicSDKInteropTests(ScriptedCase):
    """The anthropic SDK pointed at the proxy (base_url without /v1, as for Claude Code)."""

    def setUp(self):
        super().setUp()
        self.client = anthropic.Anthropic(base_url="http://127.0.0.1:%d" % self.port,
                                          api_key="unused", max_retries=0, timeout=10)
        self.addCleanup(self.client.close)

    def test_create_text_usage_and_stop_reason(self):
        self.script()
        message = self.client.messages.create(
            model=CLAUDE_MODEL, max_tokens=1024, system="Be brief.",
            metadata={"user_id": "user-1"}, extra_body={"temperature": 0.5, "top_k": 5},
            messages=[{"role": "user", "content": "say hi"}])
        self.assertEqual(message.type, "message")
        self.assertEqual(message.role, "assistant")
        self.assertEqual(message.model, CLAUDE_MODEL)
        self.assertEqual([b.type for b in message.content], ["text"])
        self.assertEqual(message.content[0].text, TEXT)
        self.assertEqual(message.stop_reason, "end_turn")
        cached = USAGE["input_tokens_details"]["cached_tokens"]
        self.assertEqual(message.usage.input_tokens, USAGE["input_tokens"] - cached)
        self.assertEqual(message.usage.cache_read_input_tokens, cached)
        self.assertEqual(message.usage.output_tokens, USAGE["output_tokens"])
        body = self.sent()
        self.assertEqual(body["instructions"], "Be brief.")
        for name in ("temperature", "top_k", "max_tokens", "max_output_tokens", "metadata"):
            self.assertNotIn(name, body)

    def test_stream_get_final_message_with_thinking(self):
        self.script(items=[harness.reasoning_item(), message_item(TEXT)])
        with self.client.messages.stream(
                model=CLAUDE_MODEL, max_tokens=1024,
                thinking={"type": "enabled", "budget_tokens": 20000},
                messages=[{"role": "user", "content": "say hi"}]) as stream:
            texts = list(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual("".join(texts), TEXT)
        self.assertEqual([b.type for b in final.content], ["thinking", "text"])
        self.assertEqual(final.content[0].thinking, "Thinking about it.")
        self.assertTrue(final.content[0].signature.endswith("gAAAA-encrypted"))
        self.assertEqual(final.content[1].text, TEXT)
        self.assertEqual(final.stop_reason, "end_turn")
        self.assertEqual(final.usage.output_tokens, USAGE["output_tokens"])
        self.assertEqual(self.sent()["reasoning"], {"effort": "high", "summary": "auto"})

        # The thinking block sent back as it came is the reasoning item again.
        self.script()
        self.client.messages.create(model=CLAUDE_MODEL, max_tokens=1024, messages=[
            {"role": "user", "content": "say hi"},
            {"role": "assistant", "content": [b.model_dump() for b in final.content]},
            {"role": "user", "content": "again"}])
        reasoning = [i for i in self.sent()["input"] if i.get("type") == "reasoning"]
        self.assertEqual([r["encrypted_content"] for r in reasoning], ["gAAAA-encrypted"])

    def test_tool_round_trip(self):
        self.script(items=[function_call_item()])
        message = self.client.messages.create(
            model=CLAUDE_MODEL, max_tokens=1024, tools=[WEATHER_TOOL_ANTHROPIC],
            messages=[{"role": "user", "content": "weather in Paris?"}])
        self.assertEqual(message.stop_reason, "tool_use")
        (call,) = [b for b in message.content if b.type == "tool_use"]
        self.assertEqual((call.id, call.name, call.input), ("call_1", "get_weather",
                                                            {"city": "Paris"}))
        self.script(items=[message_item("It is sunny in Paris.")])
        answer = self.client.messages.create(
            model=CLAUDE_MODEL, max_tokens=1024, tools=[WEATHER_TOOL_ANTHROPIC], messages=[
                {"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": [b.model_dump() for b in message.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                              "content": "sunny"}]}])
        self.assertEqual(answer.content[0].text, "It is sunny in Paris.")
        sent = self.sent()["input"]
        self.assertEqual([(i["type"], i.get("call_id")) for i in sent[1:]],
                         [("function_call", "call_1"), ("function_call_output", "call_1")])
        self.assertEqual(sent[-1]["output"], "sunny")
        self.assertEqual(self.sent()["tools"][0]["name"], "get_weather")

    def test_image(self):
        self.script(items=[message_item("A red pixel.")])
        message = self.client.messages.create(model=CLAUDE_MODEL, max_tokens=1024, messages=[
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG_1PX}},
                {"type": "text", "text": "What is this?"}]}])
        self.assertEqual(message.content[0].text, "A red pixel.")
        parts = self.sent()["input"][0]["content"]
        self.assertEqual(parts[0], {"type": "input_image", "detail": "auto",
                                    "image_url": "data:image/png;base64," + PNG_1PX})
        self.assertEqual(parts[1], {"type": "input_text", "text": "What is this?"})

    def test_count_tokens(self):
        count = self.client.messages.count_tokens(
            model=CLAUDE_MODEL, system="Be brief.", tools=[WEATHER_TOOL_ANTHROPIC],
            messages=[{"role": "user", "content": "hello " * 400}])
        self.assertGreater(count.input_tokens, 400)
        self.assertLess(count.input_tokens, 2000)
        self.assertEqual(self.backend.requests, [])

    def test_typed_errors(self):
        self.backend.replies.append(Reply(status=429, body=json.dumps({"error": {
            "type": "usage_limit_reached", "message": "The usage limit has been reached",
            "resets_in_seconds": 7200}}).encode()))
        with self.assertRaises(anthropic.RateLimitError) as caught:
            self.client.messages.create(model=CLAUDE_MODEL, max_tokens=10,
                                        messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(caught.exception.response.headers["x-should-retry"], "false")
        self.assertEqual(caught.exception.response.headers["retry-after"], "7200")
        self.assertEqual(caught.exception.body["error"]["type"], "rate_limit_error")

        self.backend.replies.append(Reply(frames=stream_frames(
            items=[], terminal="response.failed", terminal_extra={"error": {
                "code": "context_length_exceeded",
                "message": "Your input exceeds the context window of this model. Please "
                           "adjust your input and try again."}})))
        with self.assertRaises(anthropic.BadRequestError) as caught:
            with self.client.messages.stream(model=CLAUDE_MODEL, max_tokens=10, messages=[
                    {"role": "user", "content": "hi"}]) as stream:
                stream.get_final_message()
        self.assertIn("exceeds the context window", str(caught.exception))

        # After content, a failure can only be an error event: the SDK raises it too.
        self.backend.replies.append(Reply(frames=stream_frames(
            terminal="response.failed", terminal_extra={"error": {
                "code": "server_error", "message": "Backend hiccup."}})))
        with self.assertRaises(anthropic.APIStatusError) as caught:
            with self.client.messages.stream(model=CLAUDE_MODEL, max_tokens=10, messages=[
                    {"role": "user", "content": "hi"}]) as stream:
                stream.get_final_message()
        self.assertEqual(caught.exception.body["error"]["type"], "api_error")

        with self.assertRaises(anthropic.BadRequestError):
            self.client.messages.create(model=CLAUDE_MODEL, max_tokens=10, messages=[])

        self.backend.replies.append(Reply(frames=stream_frames(
            terminal="response.failed", terminal_extra={"error": {
                "code": "server_is_overloaded", "message": "Overloaded."}})))
        with self.assertRaises(anthropic.InternalServerError) as caught:
            self.client.messages.create(model=CLAUDE_MODEL, max_tokens=10,
                                        messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(caught.exception.status_code, 529)


CLAUDE_BIN = os.environ.get("CLAUDE_BIN")
NO_CLAUDE = ("set CLAUDE_BIN to Claude Code's `claude` (npm @anthropic-ai/claude-code 2.1.332) "
             "to run it against the proxy")


@unittest.skipUnless(CLAUDE_BIN and os.access(CLAUDE_BIN, os.X_OK), NO_CLAUDE)
class ClaudeCodeInteropTests(harness.ProxyTestCase):
    """Headless `claude -p` with only ANTHROPIC_BASE_URL and a dummy token, its traffic kept
    on 127.0.0.1 (CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC, its own HOME)."""

    def claude_home(self):
        home = tempfile.mkdtemp(prefix="claude-home-")
        self.addCleanup(shutil.rmtree, home, True)
        return home

    def claude(self, *args, **kw):
        """Claude Code's standard output; with ok=False, the finished run whatever its end.
        home=: a HOME of an earlier run, for --continue."""
        home = kw.get("home") or self.claude_home()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_",
                                                                          "CLAUDE_"))}
        env.update(HOME=home, ANTHROPIC_BASE_URL="http://127.0.0.1:%d" % self.port,
                   ANTHROPIC_AUTH_TOKEN="dummy", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
        env.update(kw.get("env") or {})
        run = subprocess.run([CLAUDE_BIN, "-p"] + list(args), env=env, cwd=home,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=180)
        if not kw.get("ok", True):
            return run
        self.assertEqual(run.returncode, 0, run.stdout.decode()[-2000:] +
                         run.stderr.decode()[-2000:])
        return run.stdout.decode()

    def test_plain_prompt(self):
        for _ in range(3):  # besides the turn, Claude Code may ask for a title or the like
            self.backend.replies.append(Reply(frames=stream_frames(
                items=[message_item("Hi from the subscription.")])))
        out = self.claude("say hi")
        self.assertEqual(out.strip(), "Hi from the subscription.")
        body = self.backend.requests[0]["body"]
        self.assertNotIn("system", [i.get("role") for i in body["input"]])
        self.assertNotIn("x-anthropic-billing-header", json.dumps(body))
        for name in ("metadata", "max_tokens", "context_management", "thinking"):
            self.assertNotIn(name, body)
        self.assertTrue(body["prompt_cache_key"])
        self.assertNotEqual(body["model"], CLAUDE_MODEL)  # mapped to a Codex model

    def test_effort_in_the_model_name_and_in_a_model_map_target(self):
        # Claude Code sends output_config.effort on every request (high for such names,
        # medium for its own): the one in the name must still be what the backend gets.
        harness.add_models_endpoint(self.backend)
        self.backend.models_doc = harness.EFFORT_MODELS
        self.claude("say hi", env={"ANTHROPIC_MODEL": "gpt-5.5-low"})
        sent = self.backend.requests[-1]["body"]
        self.assertEqual((sent["model"], sent["reasoning"]["effort"]), ("gpt-5.5", "low"))
        self.stop_proxy(self.proxy)
        self.start_proxy(model_map=[("claude-*", "gpt-5.5(xhigh)")])
        self.claude("say hi")
        sent = self.backend.requests[-1]["body"]
        self.assertEqual((sent["model"], sent["reasoning"]["effort"]), ("gpt-5.5", "xhigh"))

    def test_usage_limit_stops_at_once_and_says_when(self):
        for _ in range(3):
            self.backend.replies.append(Reply(status=429, body=json.dumps({"error": {
                "type": "usage_limit_reached", "message": "The usage limit has been reached",
                "resets_in_seconds": 7200}}).encode()))
        run = self.claude("say hi", ok=False)
        self.assertNotEqual(run.returncode, 0)
        self.assertIn("usage limit has been reached. It resets at", run.stdout.decode())
        self.assertEqual(len(self.backend.requests), 1, "x-should-retry: false was not heeded")

    def test_an_error_event_is_retried_and_the_retry_answers(self):
        failed = harness.custom_frames(harness.text_events(["Partial"]),
                                       terminal="response.failed", terminal_extra={
                                           "error": {"code": "server_error",
                                                     "message": "Backend hiccup."}})
        self.backend.replies.extend([Reply(frames=failed), Reply(frames=stream_frames(
            items=[message_item("Whole answer.")]))])
        self.assertEqual(self.claude("say hi").strip(), "Whole answer.")
        self.assertEqual(len(self.backend.requests), 2)

    def test_a_context_overflow_makes_it_compact_and_go_on(self):
        self.backend.replies.append(Reply(frames=stream_frames(
            items=[message_item("First answer.")])))
        home = self.claude_home()
        self.assertEqual(self.claude("first question", home=home).strip(), "First answer.")
        self.backend.replies.append(Reply(frames=stream_frames(
            items=[], terminal="response.failed", terminal_extra={"error": {
                "code": "context_length_exceeded",
                "message": "Your input exceeds the context window of this model. Please "
                           "adjust your input and try again."}})))
        for i in range(4):
            self.backend.replies.append(Reply(frames=stream_frames(
                items=[message_item("<summary>Reply %d.</summary>" % i)])))
        out = self.claude("--continue", "second question", home=home)
        self.assertIn("Reply", out)
        after = [json.dumps(r["body"]["input"]).lower() for r in self.backend.requests[2:]]
        self.assertTrue(after and "summar" in after[0], "no compaction after the overflow")

    def test_bash_tool_turn_quotes_the_tools_output(self):
        call = {"type": "function_call", "id": "fc_1", "call_id": "call_bash_1", "name": "Bash",
                "arguments": json.dumps({"command": "echo tool-output-$((6*7))",
                                         "description": "Print a number"}),
                "status": "completed"}
        self.backend.replies.append(Reply(frames=stream_frames(
            items=[harness.reasoning_item(), call])))
        answer = self.backend.codex_answer

        def quoting_the_tool(req):  # the follow-up's answer quotes what the tool returned
            outputs = [i for i in (req.json() or {}).get("input", [])
                       if i.get("type") == "function_call_output"]
            if outputs and not self.backend.replies:
                self.backend.replies.append(Reply(frames=stream_frames(items=[message_item(
                    "The command printed " + json.dumps(outputs[-1]["output"]))])))
            return answer(req)

        self.backend.route("POST", None, quoting_the_tool)
        out = json.loads(self.claude("run the echo", "--allowedTools", "Bash",
                                     "--output-format", "json"))
        self.assertEqual(out["result"], 'The command printed "tool-output-42"')
        self.assertEqual(out["num_turns"], 2)
        follow_up = self.backend.requests[1]["body"]["input"]
        kinds = [i.get("type") for i in follow_up]
        self.assertEqual(kinds[-3:], ["reasoning", "function_call", "function_call_output"])
        self.assertEqual(follow_up[-3]["encrypted_content"], "gAAAA-encrypted")
        self.assertEqual(follow_up[-2]["name"], "Bash")
        self.assertEqual(follow_up[-1]["call_id"], "call_bash_1")


# --------------------------------------------------------------------------------------------
# Responses over WebSocket
# --------------------------------------------------------------------------------------------

TERMINAL = ("response.completed", "response.failed", "response.incomplete", "error")


def until_terminal(events):
    """The events of one response, from an SDK connection's event iterator."""
    seen = []
    for event in events:
        seen.append(event)
        if event.type in TERMINAL:
            return seen
    raise AssertionError("the socket closed before a terminal event: %r" % seen)


async def until_terminal_async(conn):
    seen = []
    async for event in conn:
        seen.append(event)
        if event.type in TERMINAL:
            return seen
    raise AssertionError("the socket closed before a terminal event: %r" % seen)


@unittest.skipIf(openai is None or websockets is None, NO_WEBSOCKETS)
class ResponsesWebSocketInteropTests(SDKTestCase):
    """client.responses.connect(): one socket, a tool call, then the chain continued by
    previous_response_id with store false, as the backend's own socket allows."""

    def check_chain(self, first, second):
        done = first[-1]
        self.assertEqual(first[0].type, "response.created")
        self.assertEqual(done.type, "response.completed", done)
        calls = [item for item in done.response.output if item.type == "function_call"]
        self.assertEqual([(c.name, c.call_id) for c in calls], [("get_weather", "call_1")])
        self.assertEqual(second[-1].type, "response.completed", second[-1])
        self.assertEqual(second[-1].response.output_text, "It is sunny in Paris.")
        deltas = [e.delta for e in second if e.type == "response.output_text.delta"]
        self.assertEqual("".join(deltas), "It is sunny in Paris.")
        sent = self.sent()
        self.assertNotIn("previous_response_id", sent)
        self.assertEqual([i.get("type") or i.get("role") for i in sent["input"]],
                         ["message", "function_call", "function_call_output"])
        self.assertEqual(sent["input"][2]["output"], "sunny")
        status = self.request("GET", "/status")
        self.assertEqual(json.loads(status[2])["websocket"]["connections_total"], 1)

    def second_turn(self, response_id):
        return dict(model=MODEL, previous_response_id=response_id, store=False,
                    tools=[weather_tool_responses()],
                    input=[{"type": "function_call_output", "call_id": "call_1",
                            "output": "sunny"}])

    def test_connect_sync_two_turns_with_a_tool_call(self):
        self.script(items=[function_call_item()])
        self.script(items=[message_item("It is sunny in Paris.")])
        with self.client.responses.connect() as conn:
            conn.response.create(model=MODEL, input="weather in Paris?", store=False,
                                 tools=[weather_tool_responses()])
            first = until_terminal(conn)
            conn.response.create(**self.second_turn(first[-1].response.id))
            second = until_terminal(conn)
        self.check_chain(first, second)

    def test_connect_async_two_turns_with_a_tool_call(self):
        self.script(items=[function_call_item()])
        self.script(items=[message_item("It is sunny in Paris.")])

        async def run():
            client = openai.AsyncOpenAI(base_url="http://127.0.0.1:%d/v1" % self.port,
                                        api_key="unused", max_retries=0, timeout=10)
            try:
                async with client.responses.connect() as conn:
                    await conn.response.create(model=MODEL, input="weather in Paris?",
                                               store=False, tools=[weather_tool_responses()])
                    first = await until_terminal_async(conn)
                    await conn.response.create(**self.second_turn(first[-1].response.id))
                    return first, await until_terminal_async(conn)
            finally:
                await client.close()

        self.check_chain(*asyncio.run(run()))

    def test_unknown_previous_response_id_is_an_error_event(self):
        with self.client.responses.connect() as conn:
            conn.response.create(model=MODEL, input="hi", previous_response_id="resp_gone")
            events = until_terminal(conn)
            self.assertEqual(events[-1].type, "error")
            self.assertEqual(events[-1].error.code, "previous_response_not_found")
            self.script()
            conn.response.create(model=MODEL, input="hi")
            self.assertEqual(until_terminal(conn)[-1].response.output_text, TEXT)


@unittest.skipIf(openai is None or agents is None, NO_AGENTS)
class AgentsWebSocketInteropTests(SDKTestCase):
    """The OpenAI Agents SDK's WebSocket model runs an agent with a function tool."""

    def test_agent_with_a_function_tool_over_the_websocket_model(self):
        self.script(items=[function_call_item()])
        self.script(items=[message_item("It is sunny in Paris.")])
        calls = []

        @agents.function_tool
        def get_weather(city: str) -> str:
            """The weather in a city."""
            calls.append(city)
            return "sunny"

        async def run():
            agents.set_tracing_disabled(True)  # else it uploads traces to api.openai.com
            client = openai.AsyncOpenAI(base_url="http://127.0.0.1:%d/v1" % self.port,
                                        api_key="unused", max_retries=0, timeout=10)
            model = agents.OpenAIResponsesWSModel(model=MODEL, openai_client=client)
            agent = agents.Agent(name="weather", instructions="Answer briefly.", model=model,
                                 tools=[get_weather])
            try:
                return await agents.Runner.run(agent, "weather in Paris?",
                                               run_config=agents.RunConfig(
                                                   tracing_disabled=True))
            finally:
                await model.close()
                await client.close()

        result = asyncio.run(run())
        self.assertEqual(result.final_output, "It is sunny in Paris.")
        self.assertEqual(calls, ["Paris"])
        self.assertEqual(len(self.backend.requests), 2)
        self.assertEqual(self.sent(0)["instructions"], "Answer briefly.")
        self.assertEqual(self.sent(0)["tools"][0]["name"], "get_weather")
        outputs = [i for i in self.sent()["input"] if i.get("type") == "function_call_output"]
        self.assertEqual([(o["call_id"], o["output"]) for o in outputs], [("call_1", "sunny")])
        status = self.request("GET", "/status")
        self.assertEqual(json.loads(status[2])["websocket"]["connections_total"], 1)


CODEX_BIN = os.environ.get("CODEX_BIN")
NO_CODEX = "set CODEX_BIN to a Codex CLI (0.171.0 or newer) to run it against the proxy"
CODEX_CONFIG = """model = "gpt-5.1-codex"
model_provider = "local"

[model_providers.local]
name = "local"
base_url = "http://127.0.0.1:%d/v1"
env_key = "LOCAL_PROXY_KEY"
wire_api = "responses"
supports_websockets = true

[features]
plugins = false
unbounded_connection_retries = false

[analytics]
enabled = false
"""


class CodexCLICase(harness.ProxyTestCase):
    """The Codex CLI as a custom provider pointed at the proxy, for one `codex exec` whose
    model calls a tool (echo tool-ran) and then answers "done"."""

    def codex_exec(self, websockets):
        self.backend.replies.append(Reply(frames=stream_frames(items=[{
            "type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command",
            "arguments": json.dumps({"cmd": "echo tool-ran"}), "status": "completed"}])))
        self.backend.replies.append(Reply(frames=stream_frames(items=[message_item("done")])))
        home = tempfile.mkdtemp(prefix="codex-cli-home-")
        work = tempfile.mkdtemp(prefix="codex-cli-work-")
        self.addCleanup(shutil.rmtree, home, True)
        self.addCleanup(shutil.rmtree, work, True)
        config = CODEX_CONFIG if websockets else CODEX_CONFIG.replace(
            "supports_websockets = true\n", "")
        with open(os.path.join(home, "config.toml"), "w") as f:
            f.write(config % self.port)
        run = subprocess.run(
            [CODEX_BIN, "exec", "--skip-git-repo-check", "--ephemeral", "--json", "say hi"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=work, timeout=120, env=dict(os.environ, CODEX_HOME=home, LOCAL_PROXY_KEY="sk-local"))
        out, err = run.stdout.decode(), run.stderr.decode()
        self.assertEqual(run.returncode, 0, err)
        messages = [json.loads(line)["item"].get("text") for line in out.splitlines()
                    if '"agent_message"' in line]
        self.assertEqual(messages, ["done"])
        return out, err, json.loads(self.request("GET", "/status")[2])


@unittest.skipUnless(CODEX_BIN and os.access(CODEX_BIN, os.X_OK), NO_CODEX)
class CodexCLIWebSocketInteropTests(CodexCLICase):
    """`codex exec` with supports_websockets = true: prewarm, a tool call and its result, all
    on one socket, the later requests chained by previous_response_id with only new items."""

    def test_exec_with_a_tool_call_stays_on_one_socket(self):
        frames = []
        answer = harness.proxy.WebSocketSession.answer

        def recording(session, raw):
            frames.append(json.loads(raw))
            return answer(session, raw)

        with mock.patch.object(harness.proxy.WebSocketSession, "answer", recording):
            out, err, status = self.codex_exec(websockets=True)
        self.assertNotIn("websocket", (out + err).lower().replace("supports_websockets", ""))
        self.assertEqual(status["websocket"]["connections_total"], 1)
        self.assertEqual(status["websocket"]["responses"], 3)
        self.assertEqual(status["requests"]["by_status"].get("200"), None, "an HTTP fallback")

        prewarm, turn, follow_up = frames
        self.assertIs(prewarm["generate"], False)
        self.assertNotIn("generate", turn)
        self.assertEqual([i.get("type") for i in follow_up["input"]], ["function_call_output"])
        self.assertEqual(follow_up["input"][0]["call_id"], "call_1")
        self.assertIn("tool-ran", json.dumps(follow_up["input"][0]))
        first, second = (r["body"] for r in self.backend.requests)
        self.assertEqual(first["input"][:len(prewarm["input"])], prewarm["input"])
        self.assertEqual(first["input"][len(prewarm["input"]):], turn["input"])
        self.assertEqual(second["input"][:len(first["input"])], first["input"])
        self.assertEqual([i.get("type") for i in second["input"][len(first["input"]):]],
                         ["function_call", "function_call_output"])


@unittest.skipUnless(CODEX_BIN and os.access(CODEX_BIN, os.X_OK), NO_CODEX)
class CodexCLIImageToolInteropTests(harness.ProxyTestCase):
    """The Codex CLI's image tool (image_gen.imagegen) through the proxy. 0.171 offers it to a
    custom provider that sends an x-openai-actor-authorization header; it then POSTs
    {base_url}/images/generations and saves the image under $CODEX_HOME/generated_images."""

    def test_exec_generates_an_image_and_saves_it(self):
        png = tiny_png()
        self.backend.replies.append(Reply(frames=stream_frames(items=[{
            "type": "function_call", "id": "fc_1", "call_id": "call_img", "namespace": "image_gen",
            "name": "imagegen", "status": "completed",
            "arguments": json.dumps({"prompt": "A blue circle on a white background"})}])))
        self.backend.replies.append(Reply(body=json.dumps({
            "created": 1778832973, "data": [{"b64_json": base64.b64encode(png).decode()}],
            "background": "opaque", "output_format": "png", "quality": "low",
            "size": "1x1"}).encode()))
        self.backend.replies.append(Reply(frames=stream_frames(items=[message_item("done")])))
        home = tempfile.mkdtemp(prefix="codex-cli-home-")
        work = tempfile.mkdtemp(prefix="codex-cli-work-")
        self.addCleanup(shutil.rmtree, home, True)
        self.addCleanup(shutil.rmtree, work, True)
        config = CODEX_CONFIG.replace("supports_websockets = true\n", 'http_headers = { '
                                      '"x-openai-actor-authorization" = "local-proxy" }\n')
        with open(os.path.join(home, "config.toml"), "w") as f:
            f.write(config % self.port)
        run = subprocess.run(
            [CODEX_BIN, "exec", "--skip-git-repo-check", "--ephemeral", "--json",
             "draw a blue circle"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=work, timeout=120,
            env=dict(os.environ, CODEX_HOME=home, LOCAL_PROXY_KEY="sk-local"))
        self.assertEqual(run.returncode, 0, run.stderr.decode())
        first, image, last = self.backend.requests
        self.assertIn(("namespace", "image_gen"),
                      [(t.get("type"), t.get("name")) for t in first["body"]["tools"]])
        self.assertEqual(image["path"], "/backend-api/codex/images/generations")
        self.assertEqual((image["body"]["prompt"], image["body"]["model"]),
                         ("A blue circle on a white background", "gpt-image-2"))
        self.assertTrue(image["headers"].get("x-codex-image-turn-id"))
        output = [i for i in last["body"]["input"] if i.get("type") == "function_call_output"]
        self.assertEqual(output[0]["call_id"], "call_img")
        self.assertIn("input_image", json.dumps(output[0]["output"]))
        saved = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(
            home, "generated_images")) for f in files]
        self.assertEqual(len(saved), 1, saved)
        with open(saved[0], "rb") as f:
            self.assertEqual(f.read(), png)


@unittest.skipUnless(CODEX_BIN and os.access(CODEX_BIN, os.X_OK), NO_CODEX)
class CodexCLIHTTPInteropTests(CodexCLICase):
    """`codex exec` with a custom provider that does not say supports_websockets: each turn is
    one POST /v1/responses, the tool call's result sent back with the whole history."""

    def test_exec_with_a_tool_call_over_http(self):
        _, _, status = self.codex_exec(websockets=False)
        self.assertEqual(status["websocket"]["connections_total"], 0)
        self.assertEqual(status["requests"]["by_status"].get("200"), 2)
        first, second = (r["body"] for r in self.backend.requests)
        self.assertIs(first["stream"], True)
        self.assertEqual(second["input"][:len(first["input"])], first["input"])
        self.assertEqual([i.get("type") for i in second["input"][len(first["input"]):]],
                         ["function_call", "function_call_output"])
        self.assertIn("tool-ran", json.dumps(second["input"][-1]))


@unittest.skipUnless(CODEX_BIN and os.access(CODEX_BIN, os.X_OK), NO_CODEX)
class CodexCLILoginStatusInteropTests(harness.LoginCase):
    """`codex login status` of the real CLI on the auth.json our `login` wrote, against the
    fake issuer; and, so that its "yes" means something, on one it must refuse."""

    def codex_login_status(self):
        run = subprocess.run([CODEX_BIN, "login", "status"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                             env=dict(os.environ, CODEX_HOME=self.home))
        return run.returncode, (run.stdout + run.stderr).decode()

    def test_codex_login_status_accepts_our_login(self):
        os.remove(self.path)  # a host that never had a login
        self.assertNotEqual(self.codex_login_status()[0], 0)
        rc, said = self.run_command("login")
        self.assertEqual(rc, 0, said)
        rc, said = self.codex_login_status()
        self.assertEqual(rc, 0, said)
        self.assertIn("Logged in using ChatGPT", said)
        doc = harness.read_auth(self.home)
        doc["tokens"]["id_token"] = "not-a-jwt"
        harness.write_auth(self.home, doc)
        self.assertNotEqual(self.codex_login_status()[0], 0)


if __name__ == "__main__":
    unittest.main()

"""A fake OpenAI / Anthropic upstream for the demo, the tests and the benchmarks.

It speaks the wire formats the official ``openai`` and ``anthropic`` SDKs parse, validates and
refuses requests as the real APIs do, answers deterministically, echoes the model it was asked
for, and logs nothing per request (it keeps a bounded in-memory ledger of what it billed, see
below, so tests have an independent oracle). Shapes are written from the providers' API
references and the SDKs' type definitions (``openai/types``, ``anthropic/types`` and
``anthropic/types/beta``), never from a gateway's parser.

Code: ``core.py`` (token formulas, the parsed request, writing answers and streams),
``validation.py`` (models served, refusals), ``ledger.py``, ``openai_api.py``,
``anthropic_api.py``; this module builds the app.

Endpoints
---------
``POST /v1/chat/completions`` (plain and ``"stream": true``), ``POST /v1/responses`` (plain and
stream), ``POST /v1/embeddings``, ``GET /v1/models``, ``POST /v1/messages`` (Anthropic, plain and
stream) and ``POST /v1/messages/count_tokens``. Anything else is a 404 in OpenAI's error shape.

Validation (default behaviour, as the real APIs)
------------------------------------------------
Checked in this order, each refusal in the provider's error shape (OpenAI ``{"error":
{"message", "type": "invalid_request_error", "param", "code"}}``; Anthropic ``{"type": "error",
"error": {"type", "message"}, "request_id"}``, with a ``request-id`` header on every Anthropic
answer): bad JSON or a body that is not an object (400), no ``model`` string (400), the
``x-fake-status`` hook (below), then:

* **Chat**: ``messages`` missing (400 ``missing_required_parameter``), not a list (400
  ``invalid_type``) or empty (400 ``empty_array``), all with ``param: "messages"``; ``n`` not an
  integer (400 ``invalid_type``), < 1 (400 ``integer_below_min_value``) or > 128 (400
  ``integer_above_max_value``), ``param: "n"``; an unknown model (404 ``model_not_found``); a
  reasoning model (names starting ``o1``, ``o3``, ``o4``, ``gpt-5`` or ``gpt-6``, except
  ``*-chat-latest``) given ``max_tokens`` (400 ``unsupported_parameter``, ``param: "max_tokens"``:
  they take only ``max_completion_tokens``).
* **Responses**: an unknown model (404 ``model_not_found``); an unknown
  ``previous_response_id`` (404 ``previous_response_not_found``, ``param:
  "previous_response_id"``, below).
* **Embeddings**: ``input`` missing (400 ``missing_required_parameter``); ``dimensions`` not an
  integer or < 1 (400 ``invalid_type`` / ``integer_below_min_value``, ``param: "dimensions"``);
  an unknown model (404); ``dimensions`` on ``text-embedding-ada-002`` (400). With
  ``dimensions`` each vector has that many floats (else 8).
* **Anthropic messages**: ``max_tokens`` missing (400 ``max_tokens: Field required``), not an
  integer, or negative; ``max_tokens: 0`` is valid (cache warming: a message with ``content:
  []``, ``stop_reason: "max_tokens"`` and ``output_tokens: 0``); ``messages`` missing, not a list
  or empty (400 ``invalid_request_error``); an unknown model (404 ``not_found_error``,
  ``"model: <name>"``). ``count_tokens`` checks the same except ``max_tokens``.

**Models served**: the built-in ``gpt-4o``, ``gpt-4o-mini``, ``o3-mini``,
``text-embedding-3-small`` / ``-3-large`` / ``-ada-002``, ``claude-sonnet-4-6``,
``claude-haiku-4-5``, ``claude-opus-4-6``, every model of ``policies/prices.yaml`` (read at
start-up; globs such as ``claude-sonnet-4-5*`` match as they do there), of each ``--prices PATH``
(a price file, or a policy directory whose ``*.yaml`` files are read) and of
``$TOLLGATE_POLICIES`` when set, plus the comma-separated names or globs of ``--models`` and
``$TOLLGATE_FAKE_MODELS``. Anthropic serves only the ``claude*`` ones. The OpenAI endpoints refuse unlisted names
in OpenAI's namespace (``gpt-*``, ``o<digit>*``, ``chatgpt-*``, ``text-embedding-*``,
``dall-e*``, ``whisper*``, ``tts-*``, ...) and serve any other name, as the OpenAI-compatible
servers the fake also stands in for do (Workers AI ``@cf/...``, vLLM ``org/name``, a test's own
model). ``GET /v1/models`` lists the exact names.

Token counting (see :func:`count_input_tokens` and :func:`output_token_count`)
-------------------------------------------------------------------------------
* **Input tokens**: every text in the request counts ``ceil(len(text.encode()) / 4)`` tokens,
  and every message counts 3 more. Texts are: message ``content`` (a string, or a list of parts
  whose ``text`` strings count, recursing into a part's nested ``content`` as in Anthropic
  ``tool_result``), the Anthropic ``system`` prompt (string or text blocks; not a message),
  Responses ``instructions`` and ``input`` (a string is one text and no message; each list item
  with ``content`` is a message), and embedding ``input`` strings (no per-message overhead;
  pre-tokenised integer inputs count one token per integer). That count is clamped to the
  request body's byte length, so it never exceeds it (with the formula above the clamp is never
  reached for real requests). What the provider adds itself comes on top, beyond the body's
  size: a stored conversation (``previous_response_id``) and server tool results
  (``x-fake-tool-input-tokens``).
* **Output tokens**: per choice ``min(cap, default)``; ``cap`` is ``max_tokens`` /
  ``max_completion_tokens`` (chat, Anthropic) or ``max_output_tokens`` (Responses) when given;
  ``default`` is ``16 + B % 16`` (``B``: the body's own input count), or the
  ``x-fake-output-tokens: N`` request header (still capped). The output text is the words
  ``tok0 tok1 ... tok{N-1}``, one word per token; each streamed delta is one word (``"tok0"``,
  ``" tok1"``, ...), so the deltas concatenate to the text. When the cap cut the output short:
  chat ``finish_reason`` is ``"length"`` and Anthropic ``stop_reason`` is ``"max_tokens"``
  (Responses stays ``"completed"``). Reasoning tokens (below) count inside the cap, first.
* **Cache tokens**: ``x-fake-cache-read: N``, ``x-fake-cache-write: N`` (the short TTL: 5 minutes
  for Anthropic, OpenAI's default 30 minutes), ``x-fake-cache-write-1h: N`` (Anthropic's 1-hour
  writes) and ``x-fake-cache-write-12h: N`` (OpenAI Responses' 12-hour writes; chat has only the
  default TTL); all default 0. They split the prompt (body plus stored conversation, not tool
  results): reads are capped at it, short writes at what is left, long writes at what is left
  after those. OpenAI: ``prompt_tokens`` / ``input_tokens`` are the whole input, of which
  ``cached_tokens`` were read and ``cache_write_tokens`` written (chat: in
  ``prompt_tokens_details``, only when non-zero; Responses: in ``input_tokens_details`` always,
  with ``cache_write_tokens_details: {ttl_30m_tokens, ttl_12h_tokens}`` when non-zero).
  Anthropic: ``input_tokens`` excludes reads and writes, reported in ``cache_read_input_tokens``
  and ``cache_creation_input_tokens`` (= 5m + 1h), split in ``cache_creation:
  {ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}`` (always present). The three add up.
* **``n`` choices** (chat): ``choices`` has indexes 0..n-1, each the same answer;
  ``completion_tokens`` is the sum over the choices (as OpenAI bills). Streamed, each chunk
  carries one token of one choice, the choices interleaved, then one finish chunk per choice.
* Embeddings: ``prompt_tokens == total_tokens ==`` input tokens; each input gets deterministic
  floats in [-1, 1] derived from BLAKE2b hashes of the input.
* Anthropic ``message_delta`` is **cumulative**, as newer API versions send it: ``usage`` repeats
  ``input_tokens``, ``cache_creation_input_tokens`` and ``cache_read_input_tokens`` (the final
  totals: they exceed ``message_start``'s when server tools or an advisor grew the input), has
  the final ``output_tokens``, and ``server_tool_use`` / ``iterations`` when there are any.
  ``message_start`` carries the first turn's input and ``output_tokens: 1`` (0 for an empty
  answer). ``x-fake-legacy-message-delta: 1``: the old ``{"output_tokens": N}`` only.

Stored responses (``previous_response_id``)
-------------------------------------------
A Responses answer created with ``store`` (default true; not ``"store": false``, not a failed
or cut stream) is kept in memory (as many as the ledger keeps). A later request with its id as
``previous_response_id`` is billed the stored conversation as input on top of its own: the
earlier response's billed input minus its ``instructions`` (the API does not carry them over)
plus its output, recursively through its own chain. An unknown (or unstored) id: 404
``{"error": {"message": "Previous response with id '<id>' not found.", "type":
"invalid_request_error", "param": "previous_response_id", "code": "previous_response_not_found"}}``.

Server tools, reasoning, iterations (request headers)
-----------------------------------------------------
* ``x-fake-reasoning-tokens: N`` (chat, Responses): each choice reasons N tokens before it
  answers (within the cap: a cap below N leaves only reasoning, empty content, ``"length"``).
  They are in ``completion_tokens`` / ``output_tokens`` and in
  ``completion_tokens_details.reasoning_tokens`` / ``output_tokens_details.reasoning_tokens``,
  never in the content or any delta; Responses adds a ``reasoning`` output item (``summary:
  []``) before the message. A stream bills them when it starts.
* ``x-fake-web-search: N``, ``x-fake-web-fetch: N`` (Anthropic): N ``server_tool_use`` blocks
  (``name: "web_search"`` / ``"web_fetch"``) each followed by its ``web_search_tool_result`` /
  ``web_fetch_tool_result`` block, before the text; ``usage.server_tool_use:
  {web_search_requests, web_fetch_requests}`` (only when either is non-zero; in JSON, in
  ``message_delta``). Streamed: ``content_block_start`` with ``input: {}``, one
  ``input_json_delta``, ``content_block_stop``; results come whole in their
  ``content_block_start``.
* ``x-fake-web-search: N``, ``x-fake-file-search: N``, ``x-fake-code-interpreter: N``,
  ``x-fake-image-generation: N`` (Responses): N ``web_search_call`` / ``file_search_call`` /
  ``code_interpreter_call`` / ``image_generation_call`` output items (status ``completed``)
  before the message; streamed with ``output_item.added``, their ``response.<type>.in_progress``,
  ``.searching`` / ``.interpreting`` (with ``code_interpreter_call_code.delta`` / ``.done``) /
  ``.generating``, ``.completed`` events and ``output_item.done``.
* ``x-fake-tool-input-tokens: N`` (Responses, Anthropic): the server tools' results grow the
  billed input by N uncached tokens (in the top-level input; Anthropic: in the last sampling
  turn, so ``message_start`` does not show them and the cumulative ``message_delta`` does).
* ``x-fake-compaction-iterations: N`` (Anthropic): N ``compaction`` iterations (each a
  ``compaction`` content block first, streamed as ``content_block_start`` with ``content: null``
  and one ``compaction_delta``) of ``x-fake-compaction-tokens: IN,OUT`` tokens each (default: the
  input count, 16). As the API documents, the top-level usage does **not** include them; they
  are billed at the request model's rates.
* ``x-fake-advisor-model: claude-...`` (Anthropic, with ``x-fake-advisor-tokens: IN,OUT``,
  default: the input count, 16): the executor calls the advisor (a ``server_tool_use`` block
  ``name: "advisor"`` and an ``advisor_tool_result`` block), which runs one ``advisor_message``
  iteration at its own model's rates, then samples again reading the prompt and the advice. The
  iterations are ``message`` (the prompt, with its cache split; 0 output), ``advisor_message``
  (``model``, IN, OUT), ``message`` (input: the body's count + OUT, uncached; output: the text).
  The top level is the sum of the ``message`` iterations (the advisor's tokens are not in it).
* ``x-fake-fallback-model: claude-...`` (Anthropic, not with an advisor; ``x-fake-fallback-declined-output: K``,
  default 1): server-side fallback. The requested model declines after K output tokens (a
  ``message`` iteration naming it, reading the prompt with its cache split and the tool results),
  a ``fallback`` content block (``from`` / ``to``, ``trigger: {type: refusal}``) comes first, and
  the fallback model writes the text (a ``fallback_message`` iteration naming it, reading the
  body's input uncached: caches are per model). The top level sums both; the ledger bills the
  declined hop at the request's model and the fallback hop in ``other_models``.
* ``x-fake-shell: N`` (Responses): N ``shell_call`` items of a hosted shell, all in one container
  (``environment: {type: container_reference, container_id}``): ``tool_calls: {shell: 1}``.
* Image generation (``x-fake-image-generation: N``) also reports ``Response.tool_usage``: the
  images' tokens (``x-fake-image-gen-tokens: TEXT_IN,OUT`` each, default ``40,272``) in
  ``image_gen`` and the web searches in ``web_search.num_requests``; the ledger's ``image_gen``
  names the image tool's ``model`` (default ``gpt-image-2.6-sunburst``, the API's).
* Rate tiers: chat and Responses answer with ``service_tier`` as the API reports it (the
  request's; ``fast`` as ``priority``; unset or ``auto`` as ``default``), or ``x-fake-service-tier:
  T``. Anthropic: a request's ``speed`` and ``inference_geo`` come back in the usage
  (``message_start``'s in a stream; ``message_delta`` carries neither), or ``x-fake-service-tier``
  (as ``speed``) and ``x-fake-inference-geo``. The ledger's ``service_tier`` / ``inference_geo``
  say what was billed.
* ``x-fake-audio-input-tokens: N``, ``x-fake-audio-output-tokens: M`` (chat): N audio tokens on
  top of the text input (``prompt_tokens_details.audio_tokens``) and M of each choice's output
  tokens are audio (``completion_tokens_details.audio_tokens``); the ledger's
  ``audio_input_tokens`` / ``audio_output_tokens``.
* With compaction, an advisor or a fallback, ``usage.iterations`` lists every iteration in order
  (compactions first; each ``{type, [model], input_tokens, cache_creation_input_tokens,
  cache_read_input_tokens, cache_creation, output_tokens}``), in the JSON usage and the
  cumulative ``message_delta``.

Test hooks (request headers)
----------------------------
* ``x-fake-token-latency-ms: F`` (or the server-wide ``--token-latency-ms``): sleep F ms before
  each streamed token, or ``N * F`` ms once before a non-streamed answer. With no latency a
  stream is written in one go (same bytes, fewer writes).
* ``x-fake-status: 429`` (any status >= 400): answer with that status and an error body in the
  provider's shape (OpenAI ``{"error": {"message", "type", "param", "code"}}``, Anthropic
  ``{"type": "error", "error": {"type", "message"}, "request_id"}``), no usage. Applies to
  streams too (the error comes before any event), and before validation.
* ``x-fake-ignore-max-tokens: 1``: ignore the request's output cap (``max_tokens`` and friends)
  and answer ``default`` tokens (above), like a provider that overruns or never saw the cap.
  Usage reports the tokens actually sent.
* ``x-fake-cut-after: N`` (streams only): send the preamble events and N token events, then close
  the connection without finishing the chunked body: no final usage / stop events, and the
  client sees an incomplete body.
* ``x-fake-stream-error-after: N`` (streams): the preamble, N token events, then the API's
  mid-stream error, then a clean end of the body. Chat: ``data: {"error": {"message", "type":
  "server_error", "param": null, "code": null}}`` (no ``[DONE]``). Responses: an ``error`` event
  (``code: "server_error"``) then ``response.failed`` (``status: "failed"``, ``error: {code,
  message}``, the partial message ``incomplete``, ``usage: null``). Anthropic: ``event: error``
  with ``{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}``.
  A failed stream bills nothing (the ledger's ``error`` names it), unless
  ``x-fake-failed-usage: 1``: then it bills its input and the output generated so far, and
  Responses' ``response.failed`` carries that ``usage``.
* ``x-fake-empty-model: 1`` (streams): the first chunk's ``model`` is ``""`` (as Azure sends),
  later chunks carry the real name (chat: the first chunk; Responses: ``response.created``).
* ``x-fake-truncate-body: N`` (non-streamed 200 answers): send the status and headers, with the
  ``content-length`` of the *whole* body, then only the body's first N bytes, then drop the
  connection: a provider connection lost mid-body after the provider did (and billed) the work.
* ``x-fake-omit-usage: 1``: the same answer without usage. JSON: no ``usage`` key (Responses:
  ``"usage": null``, as its schema marks absent usage). Streams: chat sends no ``usage`` field in
  any chunk and no final usage chunk even with ``stream_options.include_usage``; Anthropic's
  ``message_start`` message and ``message_delta`` carry no ``usage``; Responses'
  ``response.completed`` has ``"usage": null``. The ledger still records the real tokens.
* ``x-fake-stall-after-ms: MS`` (200 answers): JSON builds the whole answer (the work is done and
  billed), then waits MS ms before sending anything, headers included, so a gateway's route
  timeout fires after the provider finished. Streams send every event, then hold the connection
  open MS ms before ending the body (or before the ``x-fake-cut-after`` drop).
* ``x-fake-single-write: 1`` (streams): after the total token latency (as a non-streamed answer
  waits), send every event and the end of the chunked body in ONE write, so a consumer sees the
  whole stream, including an overrun past ``max_tokens`` (with ``x-fake-ignore-max-tokens`` and
  ``x-fake-output-tokens``), in a single final chunk. With ``x-fake-stall-after-ms`` or
  ``x-fake-cut-after`` the events are one write and the end (or drop) follows.
* ``x-fake-chunk-bytes: N`` (streams, without a token latency): the same bytes in writes of N
  bytes, 1 ms apart, so an event (or a CRLF) is split wherever N falls: what a consumer must
  reassemble when a provider's TCP segments cut its events anywhere.
* Every response echoes ``x-fake-authorization`` (the ``authorization`` header received, or ""),
  ``x-fake-api-key`` (the ``x-api-key`` header received, or ""), ``x-fake-model`` (the
  requested model, or "") and ``x-fake-header-names`` (the names of all request headers
  received, lower-case, sorted, comma-separated), so tests can prove what reached the provider.
  The four generating endpoints also echo ``x-fake-id``: the id of the answer's ledger entry.

Ledger (what the provider billed)
---------------------------------
Every request to the four generating endpoints (chat completions, responses, embeddings,
messages; refusals included, ``count_tokens`` and ``/v1/models`` not) appends one entry, so a
test can check a gateway's accounting against the provider's own count rather than against the
gateway's parse of the answer. ``GET /_fake/ledger`` returns them as a JSON list, oldest first
(``?id=...`` / ``?request_id=...`` filter on those fields); ``DELETE /_fake/ledger`` clears it
(204). It keeps the last ``--ledger-size`` entries (default 100,000) so a benchmark cannot grow it
without bound; the ``x-fake-ledger-dropped`` response header counts entries evicted so far.
An entry::

    {"id": "chatcmpl-fake...", "api": "chat", "model": "gpt-4o", "request_id": "<x-request-id>",
     "stream": false, "input_tokens": 16, "output_tokens": 16, "cached": 0, "cache_write": 0,
     "cache_write_5m": 0, "cache_write_1h": 0, "cache_write_30m": 0, "cache_write_12h": 0,
     "reasoning_tokens": 0, "n": 1, "context_tokens": 0, "tool_input_tokens": 0,
     "web_search_requests": 0, "web_fetch_requests": 0, "tool_calls": {}, "iterations": [],
     "other_models": [], "previous_response_id": null, "error": null,
     "audio_input_tokens": 0, "audio_output_tokens": 0, "service_tier": "default", "inference_geo": null,
     "image_gen": null, "status": 200, "complete": true, "hooks": {"x-fake-omit-usage": "1"}}

* ``id``: the answer's id (the body's ``id``; embeddings and errors get one of their own) and the
  ``x-fake-id`` response header; ``request_id``: the ``x-request-id`` request header (Envoy's
  id, which Tollgate records as ``envoy_request_id``), or "".
* The token fields are everything billed at ``model``'s rates. ``input_tokens`` is the
  *uncached* input: the input count minus ``cached`` (cache reads) minus ``cache_write``, the
  convention of :class:`extproc.pricing.Usage`, so the billed cost is that ``Usage(input_tokens,
  cached_input_tokens=cached, cache_write_tokens=cache_write, output_tokens)`` priced, with
  ``cache_write`` split by TTL: ``cache_write_5m`` + ``cache_write_1h`` (Anthropic) or
  ``cache_write_30m`` + ``cache_write_12h`` (OpenAI). Anthropic compaction iterations are in these
  totals (the response's top-level usage leaves them out); advisor iterations are not.
* ``output_tokens``: what the provider generated and billed: the whole answer for JSON (also
  when truncated, stalled or its usage omitted; all ``n`` choices; reasoning included), and for
  streams the tokens actually generated: those before the first visible token (reasoning,
  compaction) once the stream starts, then each token event as written, so it grows while a slow
  stream runs and stops at an ``x-fake-cut-after`` cut or a client disconnect (a real provider
  stops generating then).
* ``reasoning_tokens`` (inside ``output_tokens``), ``n``; ``context_tokens``: the stored
  conversation billed for ``previous_response_id`` (inside ``input_tokens``);
  ``tool_input_tokens``: the server tools' input growth (inside ``input_tokens``).
* ``web_search_requests``, ``web_fetch_requests`` and ``tool_calls`` (the per-call tools by
  kind: ``web_search``, ``web_fetch``, ``file_search``, ``code_interpreter``,
  ``image_generation``, ``shell``; only non-zero counts): calls billed per call (containers per
  session).
* ``other_models``: what is billed at another model's rates (Anthropic advisor iterations, a
  fallback hop), each ``{"type", "model", "input_tokens", "cached", "cache_write_5m",
  "cache_write_1h", "output_tokens"}``. The whole bill is the top-level fields at ``model``'s
  rates, plus ``other_models`` each at its model's rates, plus the per-call tools, plus
  ``image_gen`` at the image model's rates.
* ``service_tier`` (the rate tier the answer says: OpenAI ``default`` / ``flex`` / ``priority``,
  Anthropic ``speed``, or null) and ``inference_geo`` (Anthropic): the rates of all of the above
  (a model's ``tiers`` / ``inference_geo`` in policies/prices.yaml). ``audio_input_tokens`` /
  ``audio_output_tokens``: the audio part of ``input_tokens`` / ``output_tokens`` (chat), billed at
  the audio rates. ``image_gen``: null, or the image generation tool's tokens ``{"model",
  "text_input", "image_input", "cached_text_input", "cached_image_input", "image_output",
  "text_output"}``.
* ``iterations``: Anthropic ``usage.iterations`` as sent, in the same per-iteration form with
  each one's ``model`` (for information: their tokens are already in the fields above).
* ``error``: the error a stream ended with (``x-fake-stream-error-after``), else null; such a
  stream bills nothing (all token fields 0) unless ``x-fake-failed-usage``.
* ``status``: the HTTP status sent; refusals bill nothing (all token fields 0).
* ``complete``: the whole body was handed to a live connection (false while a stream runs, and
  after a cut, a truncation, or a client that went away before the answer was sent).
* ``hooks``: every ``x-fake-*`` request header received, name to value.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterable

from aiohttp import web

from . import validation
from .anthropic_api import count_tokens, messages
from .core import (
    ANTHROPIC,
    CHAT,
    EMBEDDINGS,
    LATENCY_KEY,
    MODELS_KEY,
    RESPONSES,
    cache_split,
    cache_split_ttl,
    count_input_tokens,
    embedding_vector,
    error_body,
    output_plan,
    output_token_count,
    output_words,
    text_tokens,
)
from .ledger import DEFAULT_LEDGER_SIZE, LEDGER_KEY, Ledger, ledger_delete, ledger_get
from .openai_api import (
    STORE_KEY,
    ResponseStore,
    chat_completions,
    embeddings,
    models,
    not_found,
    responses,
)

__all__ = [
    "ANTHROPIC", "CHAT", "DEFAULT_LEDGER_SIZE", "EMBEDDINGS", "RESPONSES", "Ledger", "build_app", "cache_split",
    "cache_split_ttl", "count_input_tokens", "embedding_vector", "error_body", "main", "output_plan",
    "output_token_count", "output_words", "text_tokens",
]


def build_app(token_latency_ms: float = 0.0, ledger_size: int = DEFAULT_LEDGER_SIZE,
              prices: Iterable[str] = (), models_extra: Iterable[str] = ()) -> web.Application:
    """The aiohttp application; ``token_latency_ms`` is the default per-token stream latency,
    ``ledger_size`` the number of ledger entries (and stored responses) kept, the oldest evicted;
    ``prices`` and ``models_extra`` add models served (see the module docstring)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[LATENCY_KEY] = float(token_latency_ms)
    app[LEDGER_KEY] = Ledger(ledger_size)
    app[STORE_KEY] = ResponseStore(ledger_size)
    app[MODELS_KEY] = validation.ModelList.load(prices, models_extra)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_get("/_fake/ledger", ledger_get)
    app.router.add_delete("/_fake/ledger", ledger_delete)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m extproc.fakeprovider --port N [--host H] [--token-latency-ms F] [--ledger-size N]
    [--prices PATH ...] [--models NAMES]``."""
    parser = argparse.ArgumentParser(prog="python -m extproc.fakeprovider", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-latency-ms", type=float, default=0.0)
    parser.add_argument("--ledger-size", type=int, default=DEFAULT_LEDGER_SIZE,
                        help="ledger entries kept in memory (GET /_fake/ledger); the oldest are evicted")
    parser.add_argument("--prices", action="append", default=[],
                        help="a price file or policy directory whose models are served too (repeatable)")
    parser.add_argument("--models", action="append", default=[],
                        help="comma-separated model names or globs served too (repeatable)")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(
        build_app(args.token_latency_ms, args.ledger_size, args.prices, args.models),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
        loop=loop,
    )


if __name__ == "__main__":
    main()

// The official `openai` Node SDK against the proxy: create, stream, a chain by
// previous_response_id, retrieve, input_items, compact, delete. Prints one JSON line per
// step (test_interop.py checks them) and exits non-zero at the first surprise.
// Usage: node openai_sdk.mjs http://127.0.0.1:PORT/v1
import assert from 'node:assert/strict';
import OpenAI from 'openai';

const client = new OpenAI({ baseURL: process.argv[2], apiKey: 'sk-local', maxRetries: 0 });
const model = 'gpt-5.1-codex';
const report = (step, value) => console.log(JSON.stringify({ step, ...value }));

const first = await client.responses.create({ model, input: 'q1' });
report('create', { id: first.id, text: first.output_text, status: first.status });

let text = '';
let completed = null;
const stream = await client.responses.create({
  model, input: 'q2', previous_response_id: first.id, stream: true,
});
for await (const event of stream) {
  if (event.type === 'response.output_text.delta') text += event.delta;
  if (event.type === 'response.completed') completed = event.response;
}
assert.ok(completed, 'the stream ended without response.completed');
report('stream', { id: completed.id, text });

const got = await client.responses.retrieve(completed.id);
report('retrieve', { id: got.id, text: got.output_text, status: got.status });

const items = [];
for await (const item of client.responses.inputItems.list(completed.id, { limit: 1, order: 'asc' })) {
  items.push({ id: item.id, type: item.type, role: item.role });
}
report('input_items', { items });

const compacted = await client.responses.compact({ model, previous_response_id: completed.id });
report('compact', { object: compacted.object, types: compacted.output.map((i) => i.type) });

await client.responses.delete(first.id);
let status = null;
try {
  await client.responses.retrieve(first.id);
} catch (err) {
  assert.ok(err instanceof OpenAI.NotFoundError, `expected NotFoundError, got ${err}`);
  status = err.status;
}
report('delete', { retrieve_after: status });

// The official `openai` Node SDK against sluice's Responses API: one streaming response, with
// only `baseURL` changed. Run by scripts/sdk-test (SLUICE_URL is the gateway).
import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: `${process.env.SLUICE_URL}/v1`, apiKey: "not-needed-locally", maxRetries: 0 });

const stream = await client.responses.create({
  model: "sim",
  input: "hello from node",
  stream: true,
  // sluice's simulated model reads its staging from the body, as any extra field.
  sim: { tokens: 5 },
});
const types = [];
let text = "";
let last = -1;
let final;
for await (const event of stream) {
  types.push(event.type);
  assert.ok(event.sequence_number > last, `sequence numbers increase: ${event.sequence_number} after ${last}`);
  last = event.sequence_number;
  if (event.type === "response.output_text.delta") text += event.delta;
  if (event.type === "response.completed") final = event.response;
}
assert.equal(types[0], "response.created");
assert.equal(types.at(-1), "response.completed");
assert.equal(text, "Hello from sluice's simulated");
assert.equal(final.output_text ?? final.output[0].content[0].text, text);
const again = await client.responses.retrieve(final.id);
assert.equal(again.status, "completed");
console.log("node-sdk: streaming response ok");

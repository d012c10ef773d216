// sluice's web page in a real browser: Debian's chromium driven by playwright-core.
//
// Starts two gateways (`SLUICE_BIN serve`, throwaway data directories): one without keys, one
// with two tenants' keys. Each step drives the page as a user would, checks what the page shows
// against what the gateway recorded, and saves a screenshot in test-artifacts/browser/. Across
// every step: no console error, no page error, no failed request, no error status, except the
// ones a step expects (the refused key's 401s, the request a reload cuts). Exits non-zero on the
// first failure.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const require = createRequire(import.meta.url);
const BIN = process.env.SLUICE_BIN || "target/debug/sluice";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = process.env.ARTIFACTS || "test-artifacts/browser";
const AXE = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

mkdirSync(ARTIFACTS, { recursive: true });
const cleanups = [];

// ---------------------------------------------------------------- gateways

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function gateway(config) {
  const dir = mkdtempSync(join(tmpdir(), "sluice-browser-"));
  const port = await freePort();
  const configPath = join(dir, "sluice.toml");
  writeFileSync(configPath, config);
  const child = spawn(BIN, ["serve", "--listen", `127.0.0.1:${port}`, "--data-dir", join(dir, "data"), "--config", configPath], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  child.stderr.on("data", (d) => (log += d));
  cleanups.push(() => {
    child.kill("SIGTERM");
    rmSync(dir, { recursive: true, force: true });
  });
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 200; i++) {
    try {
      if ((await fetch(`${url}/healthz`)).ok) return { url, log: () => log };
    } catch (_) {
      // Not up yet.
    }
    await sleep(50);
  }
  throw new Error(`the gateway did not start:\n${log}`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function newKey() {
  const key = `sk-sluice-${randomBytes(32).toString("hex")}`;
  return { key, sha: createHash("sha256").update(key).digest("hex") };
}

// ---------------------------------------------------------------- the page, watched

const problems = [];
let expected = []; // patterns of problems the current step expects

function problem(what) {
  if (!expected.some((p) => p.test(what))) problems.push(what);
}

async function openPage(browser, url, options = {}) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 800 }, ...options });
  const page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() === "error") problem(`console error: ${m.text()}`);
  });
  page.on("pageerror", (e) => problem(`page error: ${e.message}`));
  page.on("requestfailed", (r) => problem(`request failed: ${r.method()} ${r.url()} ${r.failure() && r.failure().errorText}`));
  page.on("response", (r) => {
    if (r.status() >= 400) problem(`HTTP ${r.status()}: ${r.request().method()} ${r.url()}`);
  });
  await page.goto(url);
  return page;
}

let shot = 0;
async function screenshot(page, name) {
  shot += 1;
  const path = join(ARTIFACTS, `${String(shot).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path, fullPage: true });
  return path;
}

async function step(name, fn) {
  const started = Date.now();
  expected = [];
  await fn();
  expected = [];
  assert.deepEqual(problems, [], `${name}: the page reported problems`);
  console.log(`ok  ${name} (${Date.now() - started} ms)`);
}

/** Axe's serious and critical violations on the page as it is. */
async function accessibility(page) {
  // Evaluated through the DevTools protocol: the page's CSP (scripts from its origin only) stays on.
  await page.evaluate(AXE);
  const violations = await page.evaluate(async () => {
    const r = await globalThis.axe.run(document, { resultTypes: ["violations"] });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map((n) => n.target.join(" ")) }));
  });
  return violations.filter((v) => v.impact === "serious" || v.impact === "critical");
}

// ---------------------------------------------------------------- chat helpers

async function setExtra(page, fields) {
  if (!(await page.locator("details.options").evaluate((d) => d.open))) await page.click("details.options summary");
  await page.fill("#extra", JSON.stringify(fields));
}

async function sendPrompt(page, text) {
  await page.fill("#prompt", text);
  await page.press("#prompt", "Enter");
}

/** The last answer as the page holds it: text shown, and what it knows of the stream. */
function lastAnswer(page) {
  return page.evaluate(() => {
    const li = [...document.querySelectorAll("#messages li.assistant")].pop();
    if (!li) return null;
    return {
      text: li.querySelector(".answer").innerText,
      ending: li.querySelector(".ending").innerText,
      status: li.msg.status,
      content: li.msg.content,
      streamId: li.msg.streamId,
      seq: li.msg.seq,
    };
  });
}

async function waitForEnd(page, timeout = 20000) {
  await page.waitForFunction(
    () => {
      const li = [...document.querySelectorAll("#messages li.assistant")].pop();
      return li && li.msg.status !== "streaming" && !li.querySelector(".ending").innerText.includes("stopping");
    },
    null,
    { timeout, polling: 20 },
  );
}

async function waitForText(page, min) {
  await page.waitForFunction((n) => {
    const li = [...document.querySelectorAll("#messages li.assistant")].pop();
    return li && li.msg.content.length >= n && li.msg.streamId;
  }, min, { polling: 20 });
}

async function transcript(base, id, key) {
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  for (let i = 0; i < 100; i++) {
    const t = await (await fetch(`${base}/v1/streams/${id}`, { headers })).json();
    if (t.status !== "streaming") return t;
    await sleep(50);
  }
  throw new Error(`stream ${id} did not end`);
}

// ---------------------------------------------------------------- the steps

async function main() {
  const open = await gateway("");
  const acme = newKey();
  const globex = newKey();
  const keyed = await gateway(
    `[[keys]]\ntenant = "acme"\nkey_sha256 = "${acme.sha}"\n[[keys]]\ntenant = "globex"\nkey_sha256 = "${globex.sha}"\n[[models]]\nname = "sim"\nkind = "sim"\n` +
      `[[models]]\nname = "late"\nkind = "sim"\nsim = { first_token_ms = 5000 }\n[[routes]]\nname = "pair"\nstrategy = "gather"\ntargets = ["sim", "late"]\ntotal_timeout_ms = 800\n`,
  );
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  cleanups.push(() => browser.close());
  const page = await openPage(browser, open.url);

  await step("the page is served with a strict CSP, from the binary", async () => {
    const r = await fetch(`${open.url}/`);
    assert.equal(r.status, 200);
    assert.match(r.headers.get("content-security-policy"), /script-src 'self'/);
    await page.waitForSelector("#model option", { state: "attached" });
    assert.equal(await page.inputValue("#model"), "sim");
  });

  await step("a prompt's answer streams in, painted as it arrives", async () => {
    await setExtra(page, { sim: { tokens: 60, first_token_ms: 100, token_interval_ms: 25 } });
    await sendPrompt(page, "Tell me about **streams** <img src=x onerror=\"window.pwned=1\">");
    const lengths = new Set();
    for (;;) {
      const a = await lastAnswer(page);
      if (a && a.status !== "streaming") break;
      if (a && a.text.length) lengths.add(a.text.length);
      await sleep(15);
    }
    assert.ok(lengths.size > 1, `the answer was painted ${lengths.size} time(s) before its end`);
    await waitForEnd(page);
    await page.waitForFunction(() => /tokens\/s/.test([...document.querySelectorAll("#messages li.assistant .ending")].pop().innerText));
    const a = await lastAnswer(page);
    assert.match(a.ending, /^completed/);
    assert.match(a.ending, /first token \d+ ms/);
    assert.match(a.ending, /total \d/);
    const t = await transcript(open.url, a.streamId);
    assert.equal(t.status, "completed");
    assert.equal(a.content, t.content, "the page shows the recorded answer");
    // The user's text is shown as text: no element made from it, nothing run.
    assert.equal(await page.evaluate(() => window.pwned), undefined);
    assert.equal(await page.locator("#messages li.user img").count(), 0);
    await screenshot(page, "chat-completed");
  });

  await step("Stop cancels in the gateway and keeps what arrived", async () => {
    await setExtra(page, { sim: { tokens: 2000, first_token_ms: 20, token_interval_ms: 20 } });
    await sendPrompt(page, "A long answer, please");
    await waitForText(page, 20);
    await page.click("#stop");
    await waitForEnd(page);
    const a = await lastAnswer(page);
    assert.match(a.ending, /cancelled: stopped on request/);
    assert.ok(a.text.length > 0, "what arrived stays");
    const t = await transcript(open.url, a.streamId);
    assert.deepEqual([t.status, t.reason], ["cancelled", "requested"]);
    assert.equal(a.content, t.content);
    await screenshot(page, "chat-stopped");
  });

  await step("Esc stops too, even before the first token", async () => {
    await setExtra(page, { sim: { tokens: 50, first_token_ms: 600, token_interval_ms: 20 } });
    await sendPrompt(page, "Wait for it");
    await sleep(100);
    await page.keyboard.press("Escape");
    await waitForEnd(page);
    const a = await lastAnswer(page);
    const t = await transcript(open.url, a.streamId);
    assert.deepEqual([t.status, t.reason], ["cancelled", "requested"]);
    assert.match(a.ending, /cancelled/);
  });

  await step("a reload mid-answer resumes to the recorded text", async () => {
    await setExtra(page, { sim: { tokens: 150, first_token_ms: 20, token_interval_ms: 20 } });
    await sendPrompt(page, "Survive a reload");
    await waitForText(page, 30);
    const before = await lastAnswer(page);
    expected = [/request failed: POST .*\/v1\/chat\/completions net::ERR_ABORTED/];
    await page.reload();
    await page.waitForSelector("#messages li.assistant");
    await waitForEnd(page);
    expected = [];
    const a = await lastAnswer(page);
    assert.equal(a.streamId, before.streamId, "the same stream came back");
    assert.match(a.ending, /^completed/);
    const t = await transcript(open.url, a.streamId);
    assert.equal(t.status, "completed");
    assert.equal(a.content, t.content, "no duplicated or missing text across the reload");
    assert.ok(a.content.startsWith(before.content));
    await screenshot(page, "chat-resumed");
  });

  await step("an idle timeout is shown with its timer", async () => {
    await setExtra(page, { sim: { tokens: 5, first_token_ms: 20, token_interval_ms: 1500 }, sluice: { idle_timeout_ms: 300 } });
    await sendPrompt(page, "Then go quiet");
    await waitForEnd(page);
    const a = await lastAnswer(page);
    assert.match(a.ending, /timed out: the upstream went quiet \(idle timer\)/);
    const t = await transcript(open.url, a.streamId);
    assert.deepEqual([t.status, t.reason], ["timed_out", "idle"]);
    await screenshot(page, "chat-idle-timeout");
  });

  await step("the chat is accessible, in light and dark", async () => {
    assert.deepEqual(await accessibility(page), []);
    await page.emulateMedia({ colorScheme: "dark" });
    assert.deepEqual(await accessibility(page), []);
    await screenshot(page, "chat-dark");
    await page.emulateMedia({ colorScheme: "light" });
  });

  await step("the streams view lists streams live, with a timeline, and cancels", async () => {
    await setExtra(page, { sim: { tokens: 3000, first_token_ms: 150, token_interval_ms: 25 } });
    await sendPrompt(page, "Run while I watch");
    await waitForText(page, 5);
    const running = (await lastAnswer(page)).streamId;
    await page.click("#tab-streams");
    const row = page.locator(`#stream-table tbody tr[data-id="${running}"]`);
    await row.waitFor();
    const chunks = async () => Number(await row.locator("td").nth(3).innerText());
    const first = await chunks();
    await page.waitForFunction(
      ([id, n]) => Number(document.querySelector(`#stream-table tr[data-id="${id}"] td:nth-child(4)`).innerText) > n,
      [running, first],
      { polling: 100 },
    );
    assert.ok((await page.locator("#stream-table tbody tr").count()) >= 5);
    await row.click();
    await page.waitForSelector("#timeline line.tick", { state: "attached" });
    await page.waitForFunction(() => document.querySelector("#detail-status").innerText.includes("streaming"));
    const ticks = await page.locator("#timeline line.tick").count();
    await page.waitForFunction((n) => document.querySelectorAll("#timeline line.tick").length > n, ticks, { polling: 100 });
    assert.match(await page.locator("#timeline-caption").innerText(), /chunks · first token \d+ ms/);
    await screenshot(page, "streams-live");
    assert.deepEqual(await accessibility(page), []);
    // Following the stream ends when the page closes it: that request's end is no failure.
    expected = [/request failed: GET .*\/events.* net::ERR_ABORTED/];
    await page.click("#detail-cancel");
    await page.waitForFunction(() => document.querySelector("#detail-status").innerText.includes("cancelled"), null, { timeout: 10000 });
    const t = await transcript(open.url, running);
    assert.deepEqual([t.status, t.reason], ["cancelled", "requested"]);
    const endMarks = await page.locator("#timeline line.end").count();
    assert.equal(endMarks, 1, "the timeline shows where it ended");
    assert.equal(await page.locator("#timeline line.tick").count(), t.chunks.length);
    await screenshot(page, "streams-timeline");

    // A finished stream with a stall in it: the wait, the stall and the end are drawn.
    const idle = (await (await fetch(`${open.url}/v1/streams?limit=20`)).json()).data.find((s) => s.reason === "idle");
    await page.locator(`#stream-table tbody tr[data-id="${idle.id}"]`).click();
    await page.waitForFunction((id) => document.querySelector("#detail-title").innerText.includes(id), idle.id);
    // Its transcript loads after the title changes: wait for its caption, not the last one's.
    await page.waitForFunction(() => /ended timed out/.test(document.querySelector("#timeline-caption").textContent));
    await page.waitForSelector("#timeline line.end.bad", { state: "attached" });
    assert.match(await page.locator("#timeline-caption").innerText(), /ended timed out/);
    await page.click("#detail-close");
    await page.click("#tab-chat");
  });

  await step("a narrow window needs no sideways scrolling", async () => {
    await page.setViewportSize({ width: 360, height: 740 });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 1, `the page is ${overflow}px wider than the window`);
    await screenshot(page, "chat-narrow");
    await page.setViewportSize({ width: 1100, height: 800 });
  });

  await step("with keys: a wrong key is refused, a right one shows only its tenant's streams", async () => {
    // Another tenant's stream, made through the API.
    const theirs = await fetch(`${keyed.url}/v1/chat/completions`, {
      method: "POST",
      headers: { Authorization: `Bearer ${globex.key}`, "Content-Type": "application/json" },
      body: JSON.stringify({ model: "sim", messages: [{ role: "user", content: "hi" }], sim: { tokens: 2 } }),
    });
    assert.equal(theirs.status, 200);
    const theirId = theirs.headers.get("x-sluice-stream-id");
    expected = [/HTTP 401/, /console error: Failed to load resource: .* 401/];
    const p = await openPage(browser, keyed.url);
    await p.waitForSelector("#key-form:not([hidden])");
    assert.match(await p.locator("#alert").innerText(), /needs an API key/);
    await p.fill("#key", "sk-sluice-wrong");
    await p.click("#key-form button");
    await p.waitForFunction(() => /refused/.test(document.querySelector("#alert").innerText));
    await screenshot(p, "key-refused");
    expected = [];
    await p.fill("#key", acme.key);
    await p.click("#key-form button");
    await p.waitForSelector("#model option", { state: "attached" });
    assert.equal(await p.locator("#alert").isHidden(), true);
    await setExtra(p, { sim: { tokens: 8, token_interval_ms: 10 } });
    await sendPrompt(p, "hello from acme");
    await waitForEnd(p);
    const mine = (await lastAnswer(p)).streamId;
    await p.click("#tab-streams");
    await p.locator(`#stream-table tbody tr[data-id="${mine}"]`).waitFor();
    assert.equal(await p.locator(`#stream-table tbody tr[data-id="${theirId}"]`).count(), 0, "another tenant's stream is not listed");
    assert.equal(await p.locator("#stream-table tbody tr").count(), 1);
    // The key survives a reload (local storage).
    await p.reload();
    await p.waitForSelector(`#stream-table tbody tr[data-id="${mine}"]`);
    await screenshot(p, "key-streams");

    // A gather route: each target's answer under its name, and who timed out.
    await p.click("#tab-chat");
    await p.selectOption("#model", "pair");
    await setExtra(p, { sim: { tokens: 6, token_interval_ms: 10 } });
    await sendPrompt(p, "ask both");
    await waitForEnd(p);
    const g = await lastAnswer(p);
    assert.match(g.ending, /^completed/);
    assert.match(g.text, /sim \(completed\)/);
    assert.match(g.text, /late \(timed out\)/);
    await screenshot(p, "gather");
    await p.context().close();
  });
}

try {
  await main();
  console.log(`browser tests: all passed; screenshots in ${ARTIFACTS}`);
} catch (e) {
  console.error(`FAILED: ${e.stack || e}`);
  if (problems.length) console.error(`problems the page reported:\n  ${problems.join("\n  ")}`);
  process.exitCode = 1;
} finally {
  for (const c of cleanups.reverse()) {
    try {
      await c();
    } catch (_) {
      // Best effort.
    }
  }
}

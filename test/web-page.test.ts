/**
 * The built-in chat page in a real headless Chromium (Debian's), driven by playwright-core,
 * against the real server and engine. Markdown rendering is checked with a fixture stream
 * played over the page's own WebSocket (the shared tiny models cannot write markdown); the
 * page's code path from frame to DOM is the real one.
 */
import { existsSync, mkdirSync } from "node:fs";
import { resolve } from "node:path";
import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server.js";
import { startTestServer, STORIES, TINY_RANDOM, waitFor } from "./helpers/server.js";

const CHROMIUM = "/usr/bin/chromium";
const SHOTS = resolve(import.meta.dirname, "../.bench/screenshots");
const KEY = "page-test-key-0001";

let server: RunningServer;
let keyed: RunningServer;
let browser: Browser;

beforeAll(async () => {
  if (!existsSync(CHROMIUM)) throw new Error("Chromium is missing: .ci/run installs it (apt-get install chromium)");
  [server, keyed] = await Promise.all([
    startTestServer([{ ...STORIES, ctxSize: 2048 }, { ...TINY_RANDOM, ctxSize: 4096 }], { parallel: 2 }),
    startTestServer([{ ...STORIES, ctxSize: 1024 }], { apiKeys: [KEY] }),
  ]);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});
afterAll(async () => {
  await browser?.close();
  await Promise.all([server?.close(), keyed?.close()]);
});

/** A page with everything that went wrong in it recorded: console errors, page errors, failed or 4xx/5xx requests. */
async function openPage(context: BrowserContext, url: string) {
  const page = await context.newPage();
  const problems: string[] = [];
  const sent: Array<{ type: string; id?: string; body?: Record<string, unknown> }> = [];
  page.on("console", (m) => m.type() === "error" && problems.push(`console: ${m.text()}`));
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) => problems.push(`failed: ${r.url()}`));
  page.on("response", (r) => r.status() >= 400 && problems.push(`${r.status()}: ${r.url()}`));
  page.on("websocket", (ws) => ws.on("framesent", (f) => sent.push(JSON.parse(String(f.payload)))));
  await page.goto(url);
  return { page, problems, sent };
}

const lastRequest = (sent: Array<{ type: string; body?: Record<string, unknown> }>) => sent.filter((f) => f.type === "chat.completions.create").at(-1)!.body as { messages: Array<{ role: string; content: string }> } & Record<string, unknown>;

async function waitForReply(page: Page, n: number) {
  await page.locator(".msg.assistant").nth(n).locator(".meta").waitFor();
  return (await page.locator(".msg.assistant").nth(n).locator(".meta").textContent())!;
}

describe("the web chat page", () => {
  it("streams replies with honest figures, sends each conversation's settings, keeps conversations across a reload, stops on Esc within a frame and leaves a stopped turn out", async () => {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const { page, problems, sent } = await openPage(context, server.url);
    await page.waitForFunction(() => (document.getElementById("model") as HTMLSelectElement).options.length === 2);
    expect(await page.locator("#model option").allTextContents()).toEqual(["stories260K · ready", "llama-2-tiny-random · ready"]);

    // Settings, per conversation: they reach the request as the server receives it.
    await page.click("#settings-toggle");
    await page.fill("#set-system", "Tell a story.");
    await page.fill("#set-temperature", "0");
    await page.fill("#set-top_k", "5");
    await page.fill("#set-max_tokens", "24");
    await page.fill("#set-seed", "7");
    await page.fill("#set-stop", "Lily\nTim");
    await page.fill("#input", "Once upon a time");
    await page.press("#input", "Enter");
    const meta = await waitForReply(page, 0);
    expect(meta).toMatch(/^finish: (stop|length) · \d+ tokens \(prompt \d+\) · TTFT \d+ ms( · [\d.]+ tokens\/s)?$/);
    const body = lastRequest(sent);
    expect(body).toMatchObject({ model: "stories260K", temperature: 0, top_k: 5, max_tokens: 24, seed: 7, stop: ["Lily", "Tim"], stream_options: { include_usage: true } });
    expect(body.messages).toEqual([
      { role: "system", content: "Tell a story." },
      { role: "user", content: "Once upon a time" },
    ]);

    // A second turn carries the conversation.
    await page.fill("#input", "And then?");
    await page.click("#send");
    await waitForReply(page, 1);
    expect(lastRequest(sent).messages.map((m) => m.role)).toEqual(["system", "user", "assistant", "user"]);

    // Reload: the conversation, its title, its messages and its settings are back.
    const before = await page.locator(".msg").allTextContents();
    await page.reload();
    await page.waitForFunction(() => (document.getElementById("model") as HTMLSelectElement).options.length === 2);
    expect(await page.locator(".msg").allTextContents()).toEqual(before);
    expect(await page.locator(".conv-title").first().textContent()).toBe("Once upon a time");
    expect(await page.inputValue("#set-temperature")).toBe("0");

    // A new conversation has its own settings; the first stays in the list.
    await page.click("#new-chat");
    expect(await page.locator(".conv").count()).toBe(2);
    expect(await page.inputValue("#set-temperature")).toBe("");

    // A long reply on the random model, stopped with Esc: nothing more is drawn after the next frame.
    await page.selectOption("#model", "llama-2-tiny-random");
    await page.fill("#set-max_tokens", "3500");
    await page.fill("#input", "Go on forever");
    await page.press("#input", "Enter");
    await page.waitForFunction(() => (document.querySelector(".msg.assistant .text")?.textContent ?? "").length > 40);
    const lengths = await page.evaluate(
      () =>
        new Promise<number[]>((res) => {
          const text = () => document.querySelector(".msg.assistant .text")!.textContent!.length;
          document.dispatchEvent(new KeyboardEvent("keydown", { key: "Escape", bubbles: true }));
          requestAnimationFrame(() => {
            const afterFrame = text();
            setTimeout(() => res([afterFrame, text()]), 400);
          });
        }),
    );
    expect(lengths[1]).toBe(lengths[0]);
    expect(await waitForReply(page, 0)).toMatch(/^stopped/);
    expect(sent.some((f) => f.type === "cancel")).toBe(true);
    await waitFor(() => server.registry.resolve("llama-2-tiny-random").scheduler.busySlots === 0, 2000);
    await expect(page.locator(".msg.assistant.excluded").count()).resolves.toBe(1);

    // The stopped turn stays on screen but is not resent — until the user includes it.
    await page.fill("#set-max_tokens", "4");
    await page.fill("#input", "Short one");
    await page.press("#input", "Enter");
    await waitForReply(page, 1);
    expect(lastRequest(sent).messages).toEqual([{ role: "user", content: "Short one" }]);
    await page.getByRole("button", { name: "Send this turn with the next one" }).click();
    await page.getByRole("button", { name: "Regenerate this reply" }).click();
    await waitForReply(page, 1);
    expect(lastRequest(sent).messages.map((m) => m.content.slice(0, 13))).toEqual(["Go on forever", expect.any(String), "Short one"]);

    // Edit and resend the last message: it and what followed are replaced.
    await page.getByRole("button", { name: "Edit and resend this message" }).click();
    expect(await page.inputValue("#input")).toBe("Short one");
    await page.fill("#input", "Shorter");
    await page.press("#input", "Enter");
    await waitForReply(page, 1);
    expect(lastRequest(sent).messages.at(-1)).toEqual({ role: "user", content: "Shorter" });
    expect(await page.locator(".msg.user .text").allTextContents()).toEqual(["Go on forever", "Shorter"]);

    // A refusal in plain words: more tokens than the context holds.
    await page.click("#new-chat");
    await page.fill("#set-max_tokens", "100000");
    await page.fill("#input", "Hello");
    await page.press("#input", "Enter");
    expect(await waitForReply(page, 0)).toMatch(/^This conversation is too long for the model's context: start a new chat, leave earlier turns out, or lower Max tokens\./);
    expect(await page.locator(".msg.assistant.error").count()).toBe(1);

    expect(problems).toEqual([]);
    await context.close();
  });

  it("renders a streamed reply as sanitised markdown: headings, lists, tables, links, inline code, highlighted code with a copy button, and the model's thinking", async () => {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: server.url });
    const reply = [
      "## Plan\n\n",
      "- one **bold** step\n- a [link](https://example.com/x)\n\n",
      "| a | b |\n|---|---|\n| 1 | 2 |\n\n",
      "Use `pip install` then:\n\n",
      "```python\ndef add(a, b):\n    return a + b\n```\n\n",
      '<img src="x" onerror="window.__xss = 1"><script>window.__xss = 2</script>done',
    ].join("");
    const page = await context.newPage();
    const problems: string[] = [];
    page.on("pageerror", (e) => problems.push(e.message));
    page.on("console", (m) => m.type() === "error" && !m.text().includes("ERR_") && problems.push(m.text()));
    // The fixture: the server's chunk frames, a few characters each, then usage and done.
    await page.routeWebSocket(/\/v1\/ws$/, (ws) => {
      ws.onMessage((raw) => {
        const frame = JSON.parse(String(raw));
        if (frame.type !== "chat.completions.create") return;
        const chunk = (delta: Record<string, unknown>, finish: string | null = null) => ({ type: "chunk", id: frame.id, chunk: { object: "chat.completion.chunk", choices: [{ index: 0, delta, finish_reason: finish }] } });
        const frames = [chunk({ role: "assistant" }), ...["Adding ", "two numbers."].map((t) => chunk({ reasoning_content: t }))];
        for (let i = 0; i < reply.length; i += 7) frames.push(chunk({ content: reply.slice(i, i + 7) }));
        frames.push(chunk({}, "stop"), { type: "chunk", id: frame.id, chunk: { object: "chat.completion.chunk", choices: [], usage: { prompt_tokens: 9, completion_tokens: 80, total_tokens: 89 } } } as never, { type: "done", id: frame.id } as never);
        let i = 0;
        const tick = () => {
          if (i < frames.length) {
            ws.send(JSON.stringify(frames[i++]));
            setTimeout(tick, 2);
          }
        };
        tick();
      });
    });
    await page.goto(server.url);
    await page.waitForFunction(() => (document.getElementById("model") as HTMLSelectElement).options.length === 2);
    await page.fill("#input", "Show me");
    await page.press("#input", "Enter");
    expect(await waitForReply(page, 0)).toMatch(/^finish: stop · 80 tokens \(prompt 9\) · TTFT \d+ ms · [\d.]+ tokens\/s$/);
    const text = page.locator(".msg.assistant .text");
    expect(await text.locator("h2").textContent()).toBe("Plan");
    expect(await text.locator("li").count()).toBe(2);
    expect(await text.locator("strong").textContent()).toBe("bold");
    expect(await text.locator(".table-wrap table td").allTextContents()).toEqual(["1", "2"]);
    expect(await text.locator("p code").textContent()).toBe("pip install");
    const link = text.locator("a");
    expect(await link.getAttribute("target")).toBe("_blank");
    expect(await link.getAttribute("rel")).toBe("noopener noreferrer nofollow");
    const code = text.locator("pre code.language-python");
    expect(await code.textContent()).toBe("def add(a, b):\n    return a + b");
    expect(await code.locator(".hljs-keyword").first().textContent()).toBe("def");
    // Sanitised: the model's HTML cannot run, and its images are not fetched (no exfiltration by URL).
    expect(await page.evaluate(() => (window as unknown as { __xss?: number }).__xss)).toBeUndefined();
    expect(await text.locator("script, [onerror], img").count()).toBe(0);
    // The thinking, collapsed.
    const thinking = page.locator(".msg.assistant details.thinking");
    expect(await thinking.isVisible()).toBe(true);
    expect(await thinking.getAttribute("open")).toBeNull();
    expect(await thinking.locator(".reasoning-text").textContent()).toBe("Adding two numbers.");
    mkdirSync(SHOTS, { recursive: true });
    await page.screenshot({ path: resolve(SHOTS, "chat-markdown-1280x800-light.png") });
    // Copy puts the code on the clipboard.
    await page.getByRole("button", { name: "Copy code" }).click();
    expect(await page.evaluate(() => navigator.clipboard.readText())).toBe("def add(a, b):\n    return a + b");
    expect(problems).toEqual([]);
    await context.close();
  });

  it("asks for the API key when the server needs one, says when a key is wrong, and chats once it is right", async () => {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const { page, sent } = await openPage(context, keyed.url);
    await page.locator("#key-dialog[open]").waitFor();
    await page.fill("#key-input", "not-the-right-key");
    await page.press("#key-input", "Enter");
    await page.waitForFunction(() => document.getElementById("key-error")!.textContent!.includes("refused"));
    await page.fill("#key-input", KEY);
    await page.press("#key-input", "Enter");
    await page.waitForFunction(() => !(document.getElementById("key-dialog") as HTMLDialogElement).open);
    await page.waitForFunction(() => (document.getElementById("model") as HTMLSelectElement).options.length === 1);
    await page.fill("#input", "Once upon a time");
    await page.press("#input", "Enter");
    expect(await waitForReply(page, 0)).toMatch(/^finish: /);
    // The key went as the socket's first frame, and is kept for this tab only.
    expect(sent[0]).toEqual({ type: "auth", token: KEY });
    expect(await page.evaluate(() => [sessionStorage.getItem("spindle.apiKey"), localStorage.getItem("spindle.apiKey")])).toEqual([KEY, null]);
    await context.close();
  });

  it.each([
    ["light", 390, 844],
    ["dark", 390, 844],
    ["light", 1280, 800],
    ["dark", 1280, 800],
  ] as const)("%s theme at %i×%i: AA contrast, no horizontal scroll, every control labelled, a favicon, no errors", async (scheme, width, height) => {
    const context = await browser.newContext({ viewport: { width, height }, colorScheme: scheme });
    const { page, problems } = await openPage(context, server.url);
    await page.waitForFunction(() => (document.getElementById("model") as HTMLSelectElement).options.length === 2);
    await page.fill("#input", "Once upon a time");
    await page.press("#input", "Enter");
    await waitForReply(page, 0);
    await page.evaluate(() => document.querySelector(".msg.assistant .text")!.insertAdjacentHTML("beforeend", '<p><a href="#">a link</a> and <code>code</code></p><div class="code-block"><pre><code class="hljs"><span class="hljs-keyword">def</span> <span class="hljs-string">"s"</span> <span class="hljs-number">1</span> <span class="hljs-comment"># c</span></code></pre></div>'));
    if (width > 800) await page.click("#settings-toggle");
    expect(await page.evaluate(() => matchMedia("(prefers-color-scheme: dark)").matches)).toBe(scheme === "dark");

    // Contrast of every text the page shows against what it sits on.
    const low = await page.evaluate(() => {
      const rgb = (c: string) => (c.match(/[\d.]+/g) ?? []).map(Number);
      const lum = ([r, g, b]: number[]) => {
        const f = (v: number) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
        return 0.2126 * f(r!) + 0.7152 * f(g!) + 0.0722 * f(b!);
      };
      const background = (el: Element | null): number[] => {
        for (; el; el = el.parentElement) {
          const c = rgb(getComputedStyle(el).backgroundColor);
          if (c.length === 3 || (c.length === 4 && c[3]! > 0.5)) return c.slice(0, 3);
        }
        return [255, 255, 255];
      };
      const out: string[] = [];
      for (const el of document.querySelectorAll("body *")) {
        const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent!.trim() !== "");
        const box = (el as HTMLElement).getBoundingClientRect();
        if (!own || box.width === 0 || getComputedStyle(el).visibility === "hidden" || (el as HTMLButtonElement).disabled) continue;
        const fg = lum(rgb(getComputedStyle(el).color));
        const bg = lum(background(el));
        const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
        if (ratio < 4.5) out.push(`${el.tagName}.${el.className} "${el.textContent!.trim().slice(0, 20)}" ${ratio.toFixed(2)}`);
      }
      return out;
    });
    expect(low).toEqual([]);

    // Nothing makes the page scroll sideways, down to 360 px.
    for (const w of [width, 360]) {
      await page.setViewportSize({ width: w, height });
      expect(await page.evaluate(() => document.documentElement.scrollWidth <= document.documentElement.clientWidth)).toBe(true);
    }
    await page.setViewportSize({ width, height });

    // Every control has a name a screen reader can say.
    const unnamed = await page.evaluate(() =>
      [...document.querySelectorAll("button, input, select, textarea")]
        .filter((el) => (el as HTMLElement).offsetParent !== null)
        .filter((el) => !(el.getAttribute("aria-label") || (el as HTMLInputElement).labels?.length || (el.tagName === "BUTTON" && el.textContent!.trim())))
        .map((el) => el.id || el.outerHTML.slice(0, 60)),
    );
    expect(unnamed).toEqual([]);

    // The theme toggle switches and says so.
    const pressed = await page.getAttribute("#theme", "aria-pressed");
    expect(pressed).toBe(String(scheme === "dark"));
    mkdirSync(SHOTS, { recursive: true });
    await page.screenshot({ path: resolve(SHOTS, `chat-${width}x${height}-${scheme}.png`) });
    await page.click("#theme");
    expect(await page.getAttribute("#theme", "aria-pressed")).toBe(String(scheme !== "dark"));
    expect(await page.evaluate(() => document.documentElement.dataset.theme)).toBe(scheme === "dark" ? "light" : "dark");

    expect((await page.request.get(`${server.url}/favicon.ico`)).status()).toBe(200);
    expect(problems).toEqual([]);
    await context.close();
  });
});

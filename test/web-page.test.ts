/** The built-in chat page in a real headless Chromium (Debian's), driven by playwright-core. */
import { existsSync, mkdirSync } from "node:fs";
import { resolve } from "node:path";
import { chromium, type Browser } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server.js";
import { startTestServer, STORIES, TINY_RANDOM, waitFor } from "./helpers/server.js";

const CHROMIUM = "/usr/bin/chromium";
const SHOTS = resolve(import.meta.dirname, "../.bench/screenshots");

let server: RunningServer;
let browser: Browser;

beforeAll(async () => {
  if (!existsSync(CHROMIUM)) throw new Error("Chromium is missing: .ci/run installs it (apt-get install chromium)");
  server = await startTestServer([{ ...STORIES, ctxSize: 2048 }, { ...TINY_RANDOM, ctxSize: 4096 }], { parallel: 2 });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});
afterAll(async () => {
  await browser?.close();
  await server?.close();
});

describe("the web chat page", () => {
  it("streams a reply, shows its finish reason and speed, keeps the conversation, and stops on demand", async () => {
    const page = await browser.newPage({ viewport: { width: 390, height: 844 } });
    const frames: string[] = [];
    page.on("websocket", (ws) => ws.on("framesent", (f) => frames.push(String(f.payload))));
    await page.goto(server.url);
    await page.waitForFunction(() => (document.getElementById("model") as HTMLSelectElement).options.length === 2);
    expect(await page.locator("#model option").allTextContents()).toEqual(["stories260K", "llama-2-tiny-random"]);

    // A first turn: text appears, then a finish reason and tokens/s.
    await page.fill("#max-tokens", "200");
    await page.fill("#input", "Once upon a time");
    await page.press("#input", "Enter");
    const reply = page.locator(".msg.assistant").first();
    await reply.locator(".meta").waitFor();
    expect((await reply.locator(".text").textContent())!.length).toBeGreaterThan(0);
    expect(await reply.locator(".meta").textContent()).toMatch(/finish: (stop|length) · \d+ tokens · [\d.]+ tokens\/s/);

    // A second turn sends the whole conversation.
    await page.fill("#input", "And then?");
    await page.click("#send");
    await page.locator(".msg.assistant").nth(1).locator(".meta").waitFor();
    expect(await page.locator(".msg.assistant").nth(1).locator(".meta").textContent()).toMatch(/^finish: (stop|length)/);
    const second = JSON.parse(frames.filter((f) => f.includes("chat.completions.create")).at(-1)!);
    expect(second.body.messages.map((m: { role: string }) => m.role)).toEqual(["user", "assistant", "user"]);

    // A long reply on the random model (it hardly ever ends by itself), stopped mid-way.
    await page.selectOption("#model", "llama-2-tiny-random");
    await page.fill("#max-tokens", "3500");
    await page.fill("#input", "Go on forever");
    await page.click("#send");
    const long = page.locator(".msg.assistant").nth(2);
    await page.waitForFunction(() => (document.querySelectorAll(".msg.assistant .text")[2]?.textContent ?? "").length > 20);
    await page.click("#stop");
    await long.locator(".meta").waitFor();
    expect(await long.locator(".meta").textContent()).toMatch(/^stopped/);
    expect(frames.some((f) => f.includes('"cancel"'))).toBe(true);
    await waitFor(() => server.registry.resolve("llama-2-tiny-random").scheduler.busySlots === 0, 2000);
    expect(await page.isEnabled("#send")).toBe(true);

    mkdirSync(SHOTS, { recursive: true });
    await page.screenshot({ path: resolve(SHOTS, "chat-phone.png"), fullPage: true });
    await page.close();
  });
});

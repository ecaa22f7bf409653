// Rewrites the README's option table from the one option declaration (src/config/options.ts,
// through its build in dist/). `npm test` fails while the README's table differs from it.
import { readFileSync, writeFileSync } from "node:fs";

const root = new URL("..", import.meta.url);
const { optionsTable } = await import(new URL("dist/config/options.js", root).href);
const readme = new URL("README.md", root);
const text = readFileSync(readme, "utf8");
const start = "<!-- options:start -->";
const end = "<!-- options:end -->";
const a = text.indexOf(start);
const b = text.indexOf(end);
if (a === -1 || b === -1) throw new Error(`README.md has no ${start} … ${end} section`);
writeFileSync(readme, `${text.slice(0, a + start.length)}\n${optionsTable()}\n${text.slice(b)}`);

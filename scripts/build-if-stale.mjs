// The compiled server (dist/): `npm run build` builds it afresh (--force); `npm start`
// builds it first on a fresh clone or after a change to src/, and otherwise this costs a
// directory walk (milliseconds).
import { existsSync, readdirSync, rmSync, statSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { join } from "node:path";

const root = new URL("..", import.meta.url).pathname;
const stamp = join(root, "dist", "launch.cjs");

function newest(dir) {
  let t = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    t = Math.max(t, e.isDirectory() ? newest(p) : statSync(p).mtimeMs);
  }
  return t;
}

const built = existsSync(stamp) ? statSync(stamp).mtimeMs : 0;
const inputs = Math.max(newest(join(root, "src")), statSync(join(root, "tsconfig.json")).mtimeMs, statSync(join(root, "tsconfig.build.json")).mtimeMs);
if (process.argv.includes("--force") || built < inputs) {
  if (!process.argv.includes("--force")) process.stderr.write("spindle: building (npm run build)…\n");
  // Afresh, so no module deleted from src/ lingers in dist/.
  rmSync(join(root, "dist"), { recursive: true, force: true });
  execFileSync(process.execPath, [join(root, "node_modules", "typescript", "bin", "tsc"), "-p", join(root, "tsconfig.build.json")], { stdio: "inherit" });
}

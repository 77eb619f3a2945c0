// Exits 0 when X-Hub-Signature-256 verifies: `node verify-github.mjs <secret> <signature> < body`.
// The check is @octokit/webhooks' own, so tests/test_connector_signing.py proves a re-signed
// delivery against GitHub's official library rather than against a re-implementation of it.
import { Webhooks } from "@octokit/webhooks";

const [secret, signature] = process.argv.slice(2);
if (!secret || !signature) {
  console.error("usage: node verify-github.mjs <secret> <signature> < body");
  process.exit(2);
}
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
// verify() takes the payload as a string and checks its UTF-8 bytes: the body must be UTF-8.
const body = Buffer.concat(chunks).toString("utf8");
const valid = await new Webhooks({ secret }).verify(body, signature);
console.log(valid ? "valid" : "invalid");
process.exit(valid ? 0 : 1);

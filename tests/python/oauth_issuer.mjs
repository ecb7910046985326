// A third-party OAuth 2 authorization server for the tests: oauth2-mock-server (npm), with one
// RS256 key, on 127.0.0.1 at a free port. Its client-credentials tokens carry the requested
// `scope` and `aud`; like production issuers (which name the client as the subject of a
// client-credentials token), `sub` and `client_id` are set to the client's id. Prints the
// issuer URL on its first line, then serves until stdin closes or it is signalled.
//
// Usage: node oauth_issuer.mjs PATH/TO/oauth2-mock-server/dist/index.mjs
import { pathToFileURL } from "node:url";

const { OAuth2Server } = await import(pathToFileURL(process.argv[2]).href);
const server = new OAuth2Server();
await server.issuer.keys.generate("RS256");
server.service.on("beforeTokenSigning", (token, req) => {
  const auth = req.headers.authorization ?? "";
  let client = req.body?.client_id;
  if (auth.toLowerCase().startsWith("basic ")) {
    client = Buffer.from(auth.slice(6), "base64").toString().split(":")[0];
  }
  if (client) {
    token.payload.sub = client;
    token.payload.client_id = client;
  }
});
await server.start(0, "127.0.0.1");
server.issuer.url = `http://127.0.0.1:${server.address().port}`;
process.stdout.write(`${server.issuer.url}\n`);
const stop = async () => {
  await server.stop();
  process.exit(0);
};
process.stdin.on("end", stop);
process.stdin.resume();
process.on("SIGTERM", stop);

// Preloaded into Node test upstreams (`node --require loopback.cjs ...`): a server that asks to
// listen on a port without naming a host binds 127.0.0.1 instead of every interface, so test
// upstreams are reachable from loopback only.
"use strict";
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const first = args[0];
  if (typeof first === "number" || (typeof first === "string" && /^\d+$/.test(first))) {
    const port = Number(first);
    const rest = args.slice(1);
    if (typeof rest[0] !== "string") {
      return listen.call(this, port, "127.0.0.1", ...rest);
    }
  } else if (first && typeof first === "object" && !first.host && !first.path && first.port !== undefined) {
    return listen.call(this, { ...first, host: "127.0.0.1" }, ...args.slice(1));
  }
  return listen.apply(this, args);
};

const http = require("http");
const ms = require("ms"); // from the npm registry, installed at staging

const started = Date.now();
http
  .createServer((req, res) => {
    res.writeHead(200, { "Content-Type": "text/plain" });
    res.end(`hello from node (up ${ms(Date.now() - started)})\n`);
  })
  .listen(process.env.PORT || 8080, "0.0.0.0");

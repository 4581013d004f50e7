// An express upstream for tests/differential: parses every request the way an express app
// would (urlencoded with qs, multipart with multer, JSON for any other content type, gzip and
// deflate inflated) and appends what it parsed, plus the raw bytes, as one JSON line to the log.
// Usage: node server.js LOGFILE   (prints {"port": N} once listening on 127.0.0.1)
'use strict';
const fs = require('fs');
const express = require('express');
const multer = require('multer');

const log = process.argv[2];
const app = express();
const keep = (req, _res, buf) => { req.rawBody = buf; };

app.use(express.urlencoded({ extended: true, verify: keep, limit: '1mb' }));
app.use(multer({ limits: { fileSize: 1 << 20 } }).any());
// JSON for every other request, with or without a content type (multer has read multipart).
const notMultipart = (req) => !/^multipart\//i.test(req.headers['content-type'] || '');
app.use(express.json({ type: notMultipart, strict: false, verify: keep, limit: '1mb' }));

app.all('*', (req, res) => {
  const record = {
    method: req.method,
    url: req.originalUrl,
    path: req.path,
    query: req.query,
    headers: req.rawHeaders,
    rawBody: req.rawBody ? req.rawBody.toString('base64') : null,
    body: req.body === undefined ? null : req.body,
    files: (req.files || []).map((f) => ({ field: f.fieldname, data: f.buffer.toString('base64') })),
  };
  fs.appendFileSync(log, JSON.stringify(record) + '\n');
  res.status(200).json({ ok: true });
});

// A body the parsers refuse (bad JSON, bad charset) is recorded too: the raw bytes still arrived.
app.use((err, req, res, _next) => {
  const record = {
    method: req.method, url: req.originalUrl, path: req.path, query: req.query,
    headers: req.rawHeaders, rawBody: req.rawBody ? req.rawBody.toString('base64') : null,
    body: null, files: [], error: String(err.type || err.message),
  };
  fs.appendFileSync(log, JSON.stringify(record) + '\n');
  res.status(400).json({ error: String(err.type || err.message) });
});

const server = app.listen(0, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));

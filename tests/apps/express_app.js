// A real Express 4 application behind the gateway, for tests/path_confusion.rs.
//
// Express's defaults are kept on purpose: routing is case-insensitive and ignores a
// trailing slash ("non-strict"). It listens on 127.0.0.1 and a port the OS picks; the
// port is the first line on stdout. Every answer's body starts with a marker naming the
// handler that produced it (PUBLIC:, ADMIN-SECRET:, OTHER:), and carries what Express saw
// of the request in two headers (JSON strings, non-ASCII escaped, so any byte survives a
// header): X-Seen-Url (req.originalUrl, the raw request target) and X-Seen-Path
// (req.path, what the routes matched). GET /__seen/<anything> answers them as JSON.
'use strict';

const express = require('express');

const app = express();

function headerSafe(value) {
  return JSON.stringify(String(value)).replace(
    /[\u007f-\uffff]/g,
    (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'),
  );
}

function seen(req) {
  return { url: req.originalUrl, path: req.path };
}

app.use((req, res, next) => {
  const s = seen(req);
  res.set('X-Seen-Url', headerSafe(s.url));
  res.set('X-Seen-Path', headerSafe(s.path));
  next();
});

app.get('/public/*', (req, res) => {
  res.type('text/plain').send('PUBLIC:' + req.params[0]);
});

app.get(['/admin', '/admin/*'], (req, res) => {
  res.type('text/plain').send('ADMIN-SECRET:' + (req.params[0] || ''));
});

app.get(['/__seen', '/__seen/*'], (req, res) => {
  res.json(seen(req));
});

app.use((req, res) => {
  res.status(404).type('text/plain').send('OTHER:' + req.path);
});

// A param that is not valid percent-encoding (say %c0%ae) makes Express answer 400; keep
// that answer plain and marked.
app.use((err, req, res, next) => {
  res.status(err.status || 500).type('text/plain').send('ERROR:' + (err.status || 500));
});

const server = app.listen(0, '127.0.0.1', () => {
  process.stdout.write(server.address().port + '\n');
});

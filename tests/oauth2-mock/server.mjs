// A third-party OAuth2 server — oauth2-mock-server from the npm registry — configured for
// ehrsync's interoperability test (tests/third_party_oauth.rs). Out of the box it accepts any
// credentials, so the hooks below make it strict: client_credentials must come with the exact
// HTTP Basic header, the password grant with the right client, user and password, and a refresh
// token is good once and only if this server issued it. Tokens live TOKEN_TTL_SECONDS.
// Prints {"issuer": "..."} on stdout once listening; exits when stdin closes.
import { OAuth2Server } from 'oauth2-mock-server';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const ttl = Number(process.env.TOKEN_TTL_SECONDS ?? '4');
const clientId = env('MOCK_CLIENT_ID');
const clientSecret = env('MOCK_CLIENT_SECRET');
const username = env('MOCK_USERNAME');
const password = env('MOCK_PASSWORD');
const form = (s) => encodeURIComponent(s).replace(/%20/g, '+');
const expectedBasic = 'Basic ' + Buffer.from(`${form(clientId)}:${form(clientSecret)}`).toString('base64');
const unusedRefreshTokens = new Set();

const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');

server.service.on('beforeTokenSigning', (token) => {
  token.payload.exp = token.payload.iat + ttl;
});

server.service.on('beforeResponse', (response, req) => {
  const body = req.body;
  const reject = (status, error) => {
    response.statusCode = status;
    response.body = { error };
  };
  if (body.grant_type === 'client_credentials') {
    if (req.headers.authorization !== expectedBasic) return reject(401, 'invalid_client');
  } else if (body.grant_type === 'password') {
    if (body.client_id !== clientId || body.client_secret !== clientSecret) return reject(401, 'invalid_client');
    if (body.username !== username || body.password !== password) return reject(400, 'invalid_grant');
  } else if (body.grant_type === 'refresh_token') {
    if (body.client_id !== clientId || body.client_secret !== clientSecret) return reject(401, 'invalid_client');
    if (!unusedRefreshTokens.delete(body.refresh_token)) return reject(400, 'invalid_grant');
  } else {
    return reject(400, 'unsupported_grant_type');
  }
  if (response.body.refresh_token) unusedRefreshTokens.add(response.body.refresh_token);
  response.body.expires_in = ttl;
});

await server.start(0, '127.0.0.1');
console.log(JSON.stringify({ issuer: server.issuer.url }));
process.stdin.resume();
process.stdin.on('end', async () => {
  await server.stop();
  process.exit(0);
});

/* vllm-seqroute key page: keeps the key in a session cookie for /routing (never in the URL)
 * and reloads the dashboard. */
(function () {
  'use strict';
  var params = new URLSearchParams(window.location.search);
  if (params.has('api_key')) {  // a rejected key stays out of the address bar and history
    params.delete('api_key');
    var rest = params.toString();
    history.replaceState(null, '', window.location.pathname + (rest ? '?' + rest : '') + window.location.hash);
  }
  document.getElementById('key-form').addEventListener('submit', function (ev) {
    ev.preventDefault();
    var key = document.getElementById('key').value;
    if (!key) { return; }
    document.cookie = 'seqroute_api_key=' + encodeURIComponent(key) + '; path=' + window.location.pathname + '; SameSite=Strict';
    window.location.replace(window.location.pathname + window.location.search + window.location.hash);
  });
})();

// Shows what the seed's demo scripts write to the browser console on the page too, so the demo
// is readable without developer tools. It wraps console.log/console.error and changes nothing else.
(function () {
  var out = null;
  function show(kind, args) {
    out = out || document.getElementById('log');
    if (!out) return;
    var text = Array.prototype.map.call(args, function (a) {
      return typeof a === 'object' ? JSON.stringify(a) : String(a);
    }).join(' ');
    var line = document.createElement('div');
    line.className = kind;
    line.textContent = new Date().toISOString().slice(11, 23) + '  ' + text;
    out.insertBefore(line, out.firstChild);
    while (out.childNodes.length > 200) out.removeChild(out.lastChild);
  }
  ['log', 'error'].forEach(function (kind) {
    var original = console[kind].bind(console);
    console[kind] = function () { original.apply(null, arguments); show(kind, arguments); };
  });
})();

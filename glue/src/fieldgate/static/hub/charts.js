// fieldgate hub: draw each <figure class="chart" data-src="..."> of a gateway page with uPlot
// (vendored beside this file). data-src is a read API URL: raw readings ({ts, value}) or
// buckets ({ts, min, max, mean, count}). Every chart drawn is kept in window.fieldgateCharts
// and its figure gets data-points (how many x values it drew) or data-error.
"use strict";
(function () {
  window.fieldgateCharts = [];

  function width(el) {
    return Math.max(240, el.clientWidth || 320);
  }

  function series(bucketed) {
    var s = [{}];
    if (bucketed) {
      s.push({ label: "max", stroke: "#d08770", width: 1 });
      s.push({ label: "mean", stroke: "#2e6fb7", width: 2 });
      s.push({ label: "min", stroke: "#5e9e6e", width: 1 });
    } else {
      s.push({ label: "value", stroke: "#2e6fb7", width: 2, points: { show: false } });
    }
    return s;
  }

  function columns(rows, bucketed) {
    var xs = [], a = [], b = [], c = [];
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i];
      xs.push(r.ts / 1000);
      if (bucketed) {
        a.push(r.max);
        b.push(r.mean);
        c.push(r.min);
      } else {
        a.push(r.value);
      }
    }
    return bucketed ? [xs, a, b, c] : [xs, a];
  }

  function draw(fig) {
    var plot = fig.querySelector(".plot");
    fetch(fig.dataset.src, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (!r.ok) {
          throw new Error("HTTP " + r.status);
        }
        return r.json();
      })
      .then(function (body) {
        var rows = body.readings || [];
        var bucketed = rows.length > 0 && rows[0].mean !== undefined;
        fig.dataset.points = String(rows.length);
        if (!rows.length) {
          plot.textContent = "No readings in this window.";
          return;
        }
        var u = new uPlot(
          {
            width: width(plot),
            height: 200,
            series: series(bucketed),
            scales: { x: { time: true } },
            legend: { show: true },
          },
          columns(rows, bucketed),
          plot
        );
        u.fieldgateMetric = fig.dataset.metric;
        window.fieldgateCharts.push(u);
      })
      .catch(function (err) {
        fig.dataset.error = String(err.message || err);
        plot.textContent = "The chart could not be loaded: " + fig.dataset.error;
      });
  }

  var figures = document.querySelectorAll("figure.chart[data-src]");
  for (var i = 0; i < figures.length; i++) {
    draw(figures[i]);
  }
  window.addEventListener("resize", function () {
    window.fieldgateCharts.forEach(function (u) {
      u.setSize({ width: width(u.root.parentNode), height: 200 });
    });
  });
})();

// The device page of "fieldgate web": one uPlot chart per metric from the JSON the page
// carries (#chart-data: {series: {metric: [[ts seconds...], [values...]]}}). The charts are
// kept in window.fieldgateCharts (metric -> uPlot) and follow the width of their box.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("chart-data").textContent);
  var charts = {};
  window.fieldgateCharts = charts;
  function size(el) {
    return { width: Math.max(200, el.clientWidth), height: window.innerWidth < 768 ? 200 : 260 };
  }
  document.querySelectorAll(".plot").forEach(function (el) {
    var metric = el.getAttribute("data-metric");
    var s = size(el);
    var opts = {
      width: s.width,
      height: s.height,
      legend: { show: true },
      scales: { x: { time: true } },
      series: [{}, { label: metric, stroke: "#0b63a8", width: 1.5, spanGaps: false,
                     points: { show: data.series[metric][0].length <= 60 } }],
    };
    charts[metric] = new uPlot(opts, data.series[metric], el);
  });
  window.addEventListener("resize", function () {
    document.querySelectorAll(".plot").forEach(function (el) {
      var u = charts[el.getAttribute("data-metric")];
      if (u) { u.setSize(size(el)); }
    });
  });
})();

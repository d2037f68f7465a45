// Fill in the address the visitor used, so the command can be copied as is.
document.getElementById("gk-host").textContent = location.hostname;
document.getElementById("gk-port").textContent = location.port || "443";

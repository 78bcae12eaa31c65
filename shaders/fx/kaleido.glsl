// Kaleidoscope: folds the picture into mirrored wedges around the centre.
// Identity: segments 1.
uniform int u_kaleido_segments;
uniform float u_kaleido_rotate;     // degrees

vec2 fx_kaleido(vec2 p) {
    if (u_kaleido_segments <= 1) return p;
    float aspect = u_resolution.x / u_resolution.y;
    vec2 q = (p - 0.5) * vec2(aspect, 1.0);
    float wedge = 6.28318530718 / float(u_kaleido_segments);
    float a = mod(atan(q.y, q.x) + radians(u_kaleido_rotate), wedge);
    a = min(a, wedge - a);          // mirror every other half-wedge so the edges meet
    return length(q) * vec2(cos(a), sin(a)) / vec2(aspect, 1.0) + 0.5;
}
